"""The seed document's section 5 examples, as its snippets write them: Python `requests`, each
snippet's own URL, headers and payload (fields and values unchanged), with its placeholders
filled in (`base_url`, `model_version_id`, `api_key`). Prints one JSON object: per example, the
HTTP status and what came back, summarised where the answer is a stream or a file.

    python e2e/clients/seed_requests.py '{"url": "http://127.0.0.1:8080", "token": "igt_...",
                                          "models": {"embedding": "minilm", ...},
                                          "recording": "speech.wav"}'

"models" maps each task to the model id serving it; examples of tasks absent from it are
skipped. "recording" is the audio file 5.4 uploads (under the seed's own name and type,
"file_name.mp3" and "audio/wav", whatever its real format).

Where the seed's Python cannot run as written, only the URL plumbing is fixed, never a payload
or a header:
- 5.2 (TGI) and 5.3 to 5.7 build `f"${base_url}/..."`: in a Python f-string the `$` is kept, so
  the URL would start with "$http://". The `$` is dropped.
- 5.2 (TGI) posts to `f"{url}/..."` with `url` undefined; it is that snippet's `inference_url`.
- 5.8 sends its three calls to one `model_version_id`; here each goes to the model of its task
  (embedding, rerank, text-classification).
- 5.1.3 shows a payload only; it is posted as 5.1.2 posts its own (same URL and headers).
- 5.3's curl line runs in bash with `inference_url` and `api_key` set, as its `${...}` expect.
Each call also has a client-side `timeout`, so that a hang fails the test instead of stalling it.

Beyond section 5: the seed's 7.1 call (a `Bearer:` header and `OICM-Request-Timeout`), sent
with 5.3's payload, and a tabular prediction, whose seed example (6.2) is for a model with
another input schema than the fixture's.
"""

import base64
import json
import os
import subprocess
import sys

import requests

TIMEOUT = 300


# 5.1.3, as the seed writes it (the Jinja template's text is the Python literal's value).
chat_template_payload = {
    "messages": [
        {"role": "system", "content": "Be friendly"},
        {"role": "user", "content": "What's the capital of UAE?"},
        {"role": "assistant", "content": ""}
    ],
    "chat_template": '''
        {% if messages[0]['role'] == 'system' %}
            {% set loop_messages = messages[1:] %}
            {% set system_message = messages[0]['content'] %}
        {% else %}
            {% set loop_messages = messages %}
            {% set system_message = '' %}
        {% endif %}

        {% for message in loop_messages %}
            {% if loop.index0 == 0 %}
                {{ system_message.strip() }}
            {% endif %}
            {{ '\n\n' + message['role'] + ': ' + message['content'].strip().replace('\r\n', '\n').replace('\n\n', '\n') }}

            {% if loop.last and message['role'] == 'user' %}
                {{ '\n\nAssistant: ' }}
            {% endif %}
        {% endfor %}
    '''
}


def chat_stream(chat_response):
    """Reads a chat stream as the seed's loops do (each line's text after "data: " parsed, its
    `choices[0].delta.content` printed, lines where that fails skipped), and keeps what the test
    checks: what the loop would print and from how many chunks, the lines that are not JSON
    (but the final "data: [DONE]"), and how the stream ended."""
    printed, chunks, malformed, finish_reasons, last = "", 0, [], [], None
    for token in chat_response.iter_lines():
        line = token.decode("utf-8")
        if not line or line.startswith(":"):
            # Blank lines end events; a line starting with ":" is an SSE comment (keep-alive).
            continue
        last = line
        try:
            data_str = line[6:]
            data_json = json.loads(data_str)
        except ValueError:
            if line != "data: [DONE]":
                malformed.append(line)
            continue
        try:
            finish_reasons.append(data_json["choices"][0].get("finish_reason"))
            content = data_json["choices"][0]["delta"]["content"]
            printed += content
            chunks += 1
        except (KeyError, IndexError, TypeError):
            pass
    return {
        "content_type": chat_response.headers.get("content-type"),
        "printed": printed,
        "content_chunks": chunks,
        "malformed": malformed,
        "finish_reason": next((r for r in reversed(finish_reasons) if r), None),
        "last": last,
    }


def text_generation_5_1_2(base_url, model_version_id, api_key):
    inference_url = f"{base_url}/models/{model_version_id}/proxy/v1/chat/completions"
    headers = {
        "Authorization": f"Bearer {api_key}",
        "accept": "text/event-stream"
    }

    payload = {
        "inputs": "What is Deep Learning?",
        "max_new_tokens": 200,
        "do_sample": False,
        "stream": True
    }

    chat_response = requests.post(inference_url, headers=headers, json=payload, stream=True, timeout=TIMEOUT)
    return chat_response.status_code, chat_stream(chat_response)


def text_generation_5_1_3(base_url, model_version_id, api_key):
    inference_url = f"{base_url}/models/{model_version_id}/proxy/v1/chat/completions"
    headers = {
        "Authorization": f"Bearer {api_key}",
        "accept": "text/event-stream"
    }
    response = requests.post(inference_url, headers=headers, json=chat_template_payload, timeout=TIMEOUT)
    # Not the seed's: TGI's /chat_tokenize shows the prompt that template rendered.
    rendered = requests.post(
        f"{base_url}/models/{model_version_id}/proxy/chat_tokenize",
        headers={"Authorization": f"Bearer {api_key}"},
        json=chat_template_payload,
        timeout=TIMEOUT,
    ).json()
    return response.status_code, {
        "completion": response.json(),
        "templated_text": rendered.get("templated_text"),
        "templated_tokens": len(rendered.get("tokenize_response", [])),
    }


def text_generation_5_2_vllm(base_url, model_version_id, api_key):
    inference_url = f"{base_url}/models/{model_version_id}/proxy/v1"
    headers = {
        "Authorization": f"Bearer {api_key}",
        "accept": "text/event-stream"
    }

    endpoints = {
        "models": "models",
        "chat_completion": "chat/completions"
    }

    # e.g. retrieving model info
    model_info = requests.get(f"{inference_url}/models", headers=headers, timeout=TIMEOUT).json()
    model_name = model_info["data"][0]["id"]

    payload = {
        "model": model_name,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant"},
            {"role": "user", "content": "Describe gravity to a 6-year-old."}
        ],
        "temperature": 0.9,
        "top_p": 0.7,
        "max_tokens": 1000,
        "stream": True
    }

    chat_response = requests.post(
        f"{inference_url}/chat/completions",
        headers=headers,
        json=payload,
        stream=True,
        timeout=TIMEOUT,
    )
    return chat_response.status_code, {"model": model_name, **chat_stream(chat_response)}


def text_generation_5_2_tgi(base_url, model_version_id, api_key):
    inference_url = f"{base_url}/models/{model_version_id}/proxy/v1"

    headers = {
        "Authorization": f"Bearer {api_key}",
        "accept": "text/event-stream"
    }

    endpoints = {
        "models": "models",
        "chat_completion": "chat/completions"
    }

    model_info = requests.get(f"{inference_url}/{endpoints['models']}", headers=headers, timeout=TIMEOUT).json()
    model_name = model_info["data"][0]["id"]

    payload = {
        "model": model_name,
        "messages": [
            {
                "role": "system",
                "content": "You are a helpful assisant"
            },
            {
                "role": "user",
                "content": "describe gravity to 6-year old child in 50 words"
                # "content": "tell me a long story"

            }
        ],
        "temperature": 0.9,
        "top_p": 0.7,
        "max_tokens": 1000,
        "stream": True
    }

    chat_response = requests.post(f"{inference_url}/{endpoints['chat_completion']}", headers=headers, json=payload, stream=True, timeout=TIMEOUT)
    return chat_response.status_code, {"model": model_name, **chat_stream(chat_response)}


def text_classification_5_3(base_url, model_version_id, api_key):
    inference_url = (
        f"{base_url}/models/{model_version_id}/proxy/v1/classify"
    )

    headers = {"Authorization": f"Bearer {api_key}"}

    payload = {
        "inputs": "this is good!",
    }
    response = requests.post(f"{inference_url}", headers=headers, json=payload, timeout=TIMEOUT)
    return response.status_code, response.json()


def text_classification_5_3_curl(base_url, model_version_id, api_key):
    inference_url = (
        f"{base_url}/models/{model_version_id}/proxy/v1/classify"
    )
    curl = """curl -X POST "${inference_url}" \\
-H "Authorization: Bearer ${api_key}" \\
-H "Content-Type: application/json" \\
-d '{
  "inputs": "this is good!"
}'"""
    done = subprocess.run(
        ["bash", "-c", curl + " -s -w '\\n%{http_code}'"],
        env={**os.environ, "inference_url": inference_url, "api_key": api_key},
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=True,
    )
    body, status = done.stdout.rsplit("\n", 1)
    return int(status), json.loads(body)


def speech_recognition_5_4(base_url, model_version_id, api_key, recording):
    inference_url = (
        f"{base_url}/models/{model_version_id}/proxy/v1/transcript"
    )

    headers = {"Authorization": f"Bearer {api_key}"}

    with open(recording, "rb") as audio_file:
        files = {
            "file": (
                "file_name.mp3",
                audio_file,
                "audio/wav"
            )
        }
        response = requests.post(inference_url, headers=headers, files=files, timeout=TIMEOUT)
    return response.status_code, response.json()


def wav_summary(audio):
    """The RIFF header's sample rate and the data chunk's 16-bit sample count."""
    riff = audio[:4] == b"RIFF" and audio[8:12] == b"WAVE"
    rate = int.from_bytes(audio[24:28], "little") if riff else None
    samples = (len(audio) - 44) // 2 if riff else 0
    return {"riff": riff, "header_rate": rate, "samples": samples}


def text_to_speech_5_5(base_url, model_version_id, api_key):
    inference_url = (
        f"{base_url}/models/{model_version_id}/proxy/v1/generate-speech"
    )

    headers = {"Authorization": f"Bearer {api_key}"}

    # get the schema of the model, each tts model has its own schema
    schema = requests.get(f"{inference_url}/schema", headers=headers, timeout=TIMEOUT)
    # based on the schema, you create the post request with the supported params
    payload = {
        "prompt": "Hi, can you help me?",
        "description": "A man with clear voice"
    }
    response = requests.post(inference_url, headers=headers, json=payload, timeout=TIMEOUT)
    body = response.json()
    summary = {"schema_status": schema.status_code, "schema": schema.json()}
    if response.ok:
        summary.update(wav_summary(base64.b64decode(body["audio"])))
        summary["sampling_rate"] = body["sampling_rate"]
    else:
        summary["error"] = body
    return response.status_code, summary


def text_to_image_5_6(base_url, model_version_id, api_key):
    inference_url = (
        f"{base_url}/models/{model_version_id}/proxy/v1/generate-image"
    )

    headers = {"Authorization": f"Bearer {api_key}"}

    payload = {
        "prompt": "A man walking on the moon",
        "num_inference_steps": 20,
        "high_noise_frac": 8,
    }
    response = requests.post(f"{inference_url}", headers=headers, json=payload, timeout=TIMEOUT)
    body = response.json()
    if not response.ok:
        return response.status_code, {"error": body}
    image = base64.b64decode(body["image"])
    png = image[:8] == b"\x89PNG\r\n\x1a\n" and image[12:16] == b"IHDR"
    size = [int.from_bytes(image[16:20], "big"), int.from_bytes(image[20:24], "big")] if png else None
    return response.status_code, {"keys": sorted(body), "png": png, "size": size}


def translation_5_7(base_url, model_version_id, api_key):
    inference_url = (
        f"{base_url}/models/{model_version_id}/proxy/v1/translate"
    )

    headers = {"Authorization": f"Bearer {api_key}"}

    payload = {"text": "A man walking on the moon"}
    response = requests.post(f"{inference_url}", headers=headers, json=payload, timeout=TIMEOUT)
    return response.status_code, response.json()


def embedding_5_8(base_url, model_version_id, api_key):
    url = f"{base_url}/models/{model_version_id}/proxy/v1"
    headers = {"Authorization": f"Bearer {api_key}"}

    # Embedding
    embed_payload = {"inputs": "What is Deep Learning?"}
    embed_resp = requests.post(f"{url}/embed", headers=headers, json=embed_payload, timeout=TIMEOUT)
    return embed_resp.status_code, embed_resp.json()


def rerank_5_8(base_url, model_version_id, api_key):
    url = f"{base_url}/models/{model_version_id}/proxy/v1"
    headers = {"Authorization": f"Bearer {api_key}"}

    # Reranking
    rerank_payload = {
      "query": "What is Deep Learning?",
      "texts": ["Deep Learning is not...", "Deep learning is..."]
    }
    rerank_resp = requests.post(f"{url}/rerank", headers=headers, json=rerank_payload, timeout=TIMEOUT)
    return rerank_resp.status_code, rerank_resp.json()


def classification_5_8(base_url, model_version_id, api_key):
    url = f"{base_url}/models/{model_version_id}/proxy/v1"
    headers = {"Authorization": f"Bearer {api_key}"}

    # Classification
    classify_payload = {"inputs": "Abu Dhabi is great!"}
    classify_resp = requests.post(
      f"{url}/predict", headers=headers, json=classify_payload, timeout=TIMEOUT
    )
    return classify_resp.status_code, classify_resp.json()


def timeout_7_1(base_url, model_version_id, api_key):
    endpoint = f"{base_url}/models/{model_version_id}/proxy/v1/classify"
    data = {"inputs": "this is good!"}
    response = requests.post(endpoint, json=data, headers={
        "Bearer": api_key,
        "OICM-Request-Timeout": "300"
    }, timeout=TIMEOUT)
    return response.status_code, response.json()


def tabular(base_url, model_version_id, api_key):
    response = requests.post(
        f"{base_url}/models/{model_version_id}/proxy/v1/predict",
        headers={"Authorization": f"Bearer {api_key}"},
        json={"dataframe_split": {"columns": ["a", "b", "c", "d"], "data": [[0.1, 0.2, 0.3, 0.4]]}},
        timeout=TIMEOUT,
    )
    return response.status_code, response.json()


# (name, task, snippet), in the seed's order.
EXAMPLES = [
    ("5.1.2", "text-generation", text_generation_5_1_2),
    ("5.1.3", "text-generation", text_generation_5_1_3),
    ("5.2-vllm", "text-generation", text_generation_5_2_vllm),
    ("5.2-tgi", "text-generation", text_generation_5_2_tgi),
    ("5.3", "text-classification", text_classification_5_3),
    ("5.3-curl", "text-classification", text_classification_5_3_curl),
    ("5.4", "speech-recognition", speech_recognition_5_4),
    ("5.5", "text-to-speech", text_to_speech_5_5),
    ("5.6", "text-to-image", text_to_image_5_6),
    ("5.7", "translation", translation_5_7),
    ("5.8-embed", "embedding", embedding_5_8),
    ("5.8-rerank", "rerank", rerank_5_8),
    ("5.8-predict", "text-classification", classification_5_8),
    ("7.1", "text-classification", timeout_7_1),
    ("tabular", "tabular", tabular),
]


def main():
    spec = json.loads(sys.argv[1])
    results = {}
    for name, task, snippet in EXAMPLES:
        model = spec["models"].get(task)
        if model is None:
            continue
        if task == "speech-recognition":
            status, body = snippet(spec["url"], model, spec["token"], spec["recording"])
        else:
            status, body = snippet(spec["url"], model, spec["token"])
        results[name] = {"status": status, "body": body}
    print(json.dumps(results))


if __name__ == "__main__":
    main()
