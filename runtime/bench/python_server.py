"""The Python reference for the runtime benchmark: TEI's `/embed` body over sentence-transformers,
served by the standard library's threading HTTP server.

    python runtime/bench/python_server.py MODEL_DIR PORT THREADS
"""
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch
from sentence_transformers import SentenceTransformer

model_dir, port, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(threads)
model = SentenceTransformer(model_dir, device="cpu")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes; with Nagle's algorithm the second waits for a
    # delayed ACK (~40 ms), which would make the reference look far slower than it is.
    disable_nagle_algorithm = True

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.reply(200, b'{"status":"ok"}')

    def do_POST(self):
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        inputs = request["inputs"]
        single = isinstance(inputs, str)
        with torch.inference_mode():
            vectors = model.encode([inputs] if single else inputs, normalize_embeddings=request.get("normalize", True))
        self.reply(200, json.dumps(vectors.tolist()).encode())

    def reply(self, status, body):
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
