"""The demo's sample requests, through the proxy with the demo token: embedding similarity of
real sentences, a classification, a tabular prediction, a rerank, a chat and a translation,
printed readably. Used by scripts/demo.sh.

    python scripts/demo_requests.py http://127.0.0.1:8080 igt_...
"""

import math
import sys

import requests


def call(base, token, model, path, body):
    response = requests.post(
        f"{base}/models/{model}/proxy/v1/{path}",
        headers={"Authorization": f"Bearer {token}"},
        json=body,
        timeout=120,
    )
    response.raise_for_status()
    return response.json()


def cosine(a, b):
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def main():
    base, token = sys.argv[1:3]
    sentences = ["A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby."]
    vectors = [item["embedding"] for item in call(base, token, "minilm-v1", "embeddings", {"input": sentences})["data"]]
    print(f"\nEmbeddings: all-MiniLM-L6-v2 ({len(vectors[0])} dimensions), cosine similarity")
    for other in (1, 2):
        print(f"  {sentences[0]!r:<26} vs {sentences[other]!r:<38} {cosine(vectors[0], vectors[other]):.3f}")

    print("\nThe other models are tiny fixtures with random weights: the shapes are real, the answers are not.")
    labels = call(base, token, "sentiment-tiny", "classify", {"inputs": "I love this product"})["classification"]
    print("Classification  'I love this product' ->", ", ".join(f"{l['label']} {l['score']:.3f}" for l in labels))
    prediction = call(base, token, "house-prices-tiny", "predict", [[0.1, 0.2, 0.3, 0.4]])
    print("Tabular         [0.1, 0.2, 0.3, 0.4] ->", [round(x, 4) for x in prediction["data"][0]])
    ranks = call(base, token, "reranker-tiny", "rerank", {"query": "What is infergate?", "texts": ["A model gateway", "A garden gate"]})
    print("Rerank          best first ->", [(r["index"], round(r["score"], 4)) for r in ranks])
    chat = call(base, token, "chat-tiny", "chat/completions", {"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 16})
    print("Chat            ->", repr(chat["choices"][0]["message"]["content"]))
    translation = call(base, token, "translator-tiny", "translate", {"text": "Hello, world"})
    print("Translation     'Hello, world' ->", repr(translation["translation"]))


if __name__ == "__main__":
    main()
