"""The official `openai` Python client, unmodified, pointed at infergate's proxy: a streamed
chat and embeddings (which the client requests base64-encoded and decodes itself). Prints one
JSON object with what came back.

    python e2e/clients/openai_client.py URL TOKEN CHAT_MODEL_ID EMBEDDING_MODEL_ID
"""

import json
import sys
import time

import openai


def main():
    url, token, chat_model, embedding_model = sys.argv[1:5]
    result = {}
    chat = openai.OpenAI(base_url=f"{url}/models/{chat_model}/proxy/v1", api_key=token)
    started = time.monotonic()
    arrivals, text = [], ""
    stream = chat.chat.completions.create(
        model="anything",
        messages=[{"role": "user", "content": "Hello!"}],
        max_tokens=48,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.monotonic() - started)
            text += chunk.choices[0].delta.content
    result["chat"] = {"chunks": len(arrivals), "first_s": arrivals[0], "last_s": arrivals[-1], "text": text}
    embedder = openai.OpenAI(base_url=f"{url}/models/{embedding_model}/proxy/v1", api_key=token)
    embedded = embedder.embeddings.create(model="anything", input=["infergate", "a model gateway"])
    result["embeddings"] = {"count": len(embedded.data), "dims": len(embedded.data[0].embedding),
                            "norm": sum(x * x for x in embedded.data[0].embedding)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
