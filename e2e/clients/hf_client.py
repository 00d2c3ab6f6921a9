"""huggingface_hub's InferenceClient, unmodified, pointed at infergate's proxy with
`model=<host>/models/<id>/proxy`: it posts non-chat tasks to that URL itself (TEI's and TGI's
`POST /`) and chat to `.../v1/chat/completions`. Prints one JSON object with what came back.

    python e2e/clients/hf_client.py URL TOKEN '{"embedding": "<id>", ...}' [RECORDING]
"""

import json
import os
import sys

# The client refuses every URL, local ones included, while offline mode is on.
for offline in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.pop(offline, None)

from huggingface_hub import InferenceClient  # noqa: E402


def main():
    url, token, models = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])

    def client(task):
        return InferenceClient(model=f"{url}/models/{models[task]}/proxy", token=token)

    result = {}
    embedder = client("embedding")
    result["feature_extraction"] = list(embedder.feature_extraction("infergate").shape)
    result["sentence_similarity"] = embedder.sentence_similarity(
        "A man is eating food.", ["A man is eating a piece of bread.", "The girl is carrying a baby."]
    )
    # health_check refuses the default provider ("auto"), though it only GETs <model>/health.
    health = InferenceClient(model=f"{url}/models/{models['embedding']}/proxy", token=token, provider="hf-inference")
    result["health_check"] = health.health_check()
    labels = client("text-classification").text_classification("I love this product")
    result["text_classification"] = [[label.label, label.score] for label in labels]
    result["translation"] = client("translation").translation("Hello, world").translation_text
    generator = client("text-generation")
    result["text_generation"] = list(generator.text_generation("Once upon", max_new_tokens=8, stream=True))
    chunks = generator.chat_completion(
        messages=[{"role": "user", "content": "Hello!"}], max_tokens=8, stream=True
    )
    result["chat_completion"] = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    if "text-to-image" in models:
        image = client("text-to-image").text_to_image("a lighthouse at dusk", num_inference_steps=2, width=32,
                                                      height=40, seed=1)
        result["text_to_image"] = list(image.size)
    if "text-to-speech" in models:
        result["text_to_speech"] = client("text-to-speech").text_to_speech("Hello from infergate")[:4].decode()
    if "speech-recognition" in models and len(sys.argv) > 4:
        with open(sys.argv[4], "rb") as audio:
            recording = audio.read()
        result["automatic_speech_recognition"] = client("speech-recognition").automatic_speech_recognition(recording).text
    print(json.dumps(result))


if __name__ == "__main__":
    main()
