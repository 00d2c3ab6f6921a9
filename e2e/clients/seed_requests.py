"""The seed document's way of calling infergate: Python `requests`, one snippet per task, with
its placeholders filled in. Prints one JSON object: per task, the HTTP status and what came back.

    python e2e/clients/seed_requests.py '{"url": "http://127.0.0.1:8080", "token": "igt_...",
                                          "models": {"embedding": "minilm", ...},
                                          "recording": "speech.wav"}'

Tasks absent from "models" are skipped. The classification and chat snippets send the seed's
`Bearer:` header; the others send `Authorization: Bearer`.
"""

import base64
import json
import sys

import requests


def embedding(base, token):
    response = requests.post(
        f"{base}/v1/embeddings",
        headers={"Authorization": f"Bearer {token}"},
        json={"input": ["A man is eating food.", "A man is eating a piece of bread."]},
        timeout=60,
    )
    vectors = [item["embedding"] for item in response.json()["data"]]
    dot = sum(a * b for a, b in zip(*vectors))
    return response.status_code, {"dims": len(vectors[0]), "cosine": dot}


def text_classification(base, token):
    response = requests.post(
        f"{base}/v1/classify",
        headers={"Bearer": token},
        json={"inputs": "I love this product"},
        timeout=60,
    )
    return response.status_code, response.json()


def rerank(base, token):
    response = requests.post(
        f"{base}/v1/rerank",
        headers={"Authorization": f"Bearer {token}"},
        json={"query": "What is Deep Learning?", "texts": ["Deep Learning is not...", "Deep learning is..."]},
        timeout=60,
    )
    return response.status_code, response.json()


def tabular(base, token):
    response = requests.post(
        f"{base}/v1/predict",
        headers={"Authorization": f"Bearer {token}"},
        json={"dataframe_split": {"columns": ["a", "b", "c", "d"], "data": [[0.1, 0.2, 0.3, 0.4]]}},
        timeout=60,
    )
    return response.status_code, response.json()


def text_generation(base, token):
    # The seed's TGI-style body, streamed, with its `Bearer:` header.
    response = requests.post(
        f"{base}/v1/chat/completions",
        headers={"Bearer": token},
        json={"inputs": "What is Deep Learning?", "max_new_tokens": 16, "do_sample": False, "stream": True},
        stream=True,
        timeout=60,
    )
    events = [line for line in response.iter_lines(decode_unicode=True) if line.startswith("data:")]
    return response.status_code, {"events": len(events), "last": events[-1] if events else None}


def translation(base, token):
    response = requests.post(
        f"{base}/v1/translate",
        headers={"Authorization": f"Bearer {token}"},
        json={"text": "Hello, world"},
        timeout=60,
    )
    return response.status_code, response.json()


def speech_recognition(base, token, recording):
    with open(recording, "rb") as audio:
        response = requests.post(
            f"{base}/v1/transcript",
            headers={"Authorization": f"Bearer {token}"},
            files={"file": audio},
            timeout=60,
        )
    return response.status_code, response.json()


def text_to_speech(base, token):
    response = requests.post(
        f"{base}/v1/generate-speech",
        headers={"Authorization": f"Bearer {token}"},
        json={"text": "Hello, world"},
        timeout=60,
    )
    body = response.json()
    audio = base64.b64decode(body["audio"]) if response.ok else b""
    return response.status_code, {"riff": audio[:4] == b"RIFF", "sampling_rate": body.get("sampling_rate")}


def text_to_image(base, token):
    response = requests.post(
        f"{base}/v1/generate-image",
        headers={"Authorization": f"Bearer {token}"},
        json={"prompt": "a lighthouse at dusk", "num_inference_steps": 2, "width": 32, "height": 32},
        timeout=120,
    )
    image = base64.b64decode(response.json()["image"]) if response.ok else b""
    return response.status_code, {"png": image[:8] == b"\x89PNG\r\n\x1a\n"}


SNIPPETS = {
    "embedding": embedding,
    "text-classification": text_classification,
    "rerank": rerank,
    "tabular": tabular,
    "text-generation": text_generation,
    "translation": translation,
    "speech-recognition": speech_recognition,
    "text-to-speech": text_to_speech,
    "text-to-image": text_to_image,
}


def main():
    spec = json.loads(sys.argv[1])
    results = {}
    for task, model in spec["models"].items():
        base = f"{spec['url']}/models/{model}/proxy"
        if task == "speech-recognition":
            status, body = SNIPPETS[task](base, spec["token"], spec["recording"])
        else:
            status, body = SNIPPETS[task](base, spec["token"])
        results[task] = {"status": status, "body": body}
    print(json.dumps(results))


if __name__ == "__main__":
    main()
