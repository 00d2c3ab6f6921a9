"""The `text-generation` client (TGI's own Python client, 0.7), unmodified, pointed at infergate's
proxy with `Client(<host>/models/<id>/proxy)`: `generate` and `generate_stream`, which post to
the endpoint root and `/generate_stream`. It pins huggingface-hub below 1.0, so it runs in its
own virtualenv (scripts/setup.sh makes it). Prints one JSON object with what came back.

    <that venv>/bin/python e2e/clients/tgi_client.py URL TOKEN MODEL_ID
"""

import json
import sys

from text_generation import Client


def main():
    url, token, model = sys.argv[1:4]
    client = Client(f"{url}/models/{model}/proxy", headers={"Authorization": f"Bearer {token}"}, timeout=60)
    response = client.generate("Once upon a time", max_new_tokens=8)
    streamed = [r for r in client.generate_stream("Once upon a time", max_new_tokens=8)]
    print(json.dumps({
        "generated_text": response.generated_text,
        "finish_reason": str(response.details.finish_reason),
        "generated_tokens": response.details.generated_tokens,
        "stream_tokens": sum(1 for r in streamed if r.token is not None),
        "stream_final": streamed[-1].generated_text if streamed else None,
    }))


if __name__ == "__main__":
    main()
