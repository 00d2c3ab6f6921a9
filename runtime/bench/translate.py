"""Translation benchmark: infergate-runtime's /v1/translate against transformers `generate` on the
same randomly initialised MarianMT (opus-mt sized: d_model 512, 6+6 layers) and torch threads.
Run through translate.sh. Both translate the same 16 sentences, one request / one `generate`
call, greedy and with 4 beams, to the same fixed length (EOS never chosen first: random
weights), and report sentences/s.
"""
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import torch
import transformers

SENTENCES = ["the cat sees a fish", "a small cat runs to the house", "the dog sleeps", "a red bird sees the cat"] * 4


def make_model(out: pathlib.Path, fixture: pathlib.Path) -> None:
    torch.manual_seed(0)
    vocab = json.loads((fixture / "vocab.json").read_text())
    config = transformers.MarianConfig(
        vocab_size=len(vocab), d_model=512, encoder_layers=6, decoder_layers=6, encoder_attention_heads=8,
        decoder_attention_heads=8, encoder_ffn_dim=2048, decoder_ffn_dim=2048, max_position_embeddings=512,
        pad_token_id=vocab["<pad>"], eos_token_id=vocab["</s>"], decoder_start_token_id=vocab["<pad>"],
        forced_eos_token_id=vocab["</s>"], scale_embedding=True, activation_function="swish",
    )
    model = transformers.MarianMTModel(config)
    model.generation_config = transformers.GenerationConfig(
        decoder_start_token_id=config.decoder_start_token_id, eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id, forced_eos_token_id=config.eos_token_id,
        bad_words_ids=[[config.pad_token_id]], max_length=32, num_beams=1,
    )
    model.save_pretrained(out, safe_serialization=True)
    for name in ["source.spm", "target.spm", "vocab.json", "tokenizer_config.json"]:
        shutil.copy(fixture / name, out / name)


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.loads(response.read())


def main() -> None:
    binary, fixture, threads = sys.argv[1], pathlib.Path(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(threads)
    work = pathlib.Path(tempfile.mkdtemp())
    rows = {}
    try:
        model_dir = work / "bench-marian"
        make_model(model_dir, fixture)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        server = subprocess.Popen([binary, "--task", "translation", "--model-dir", str(model_dir),
                                   "--listen", f"127.0.0.1:{port}", "--torch-threads", str(threads)],
                                  env={**os.environ, "RUST_LOG": "warn"})
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(600):
                try:
                    urllib.request.urlopen(f"{url}/health", timeout=1)
                    break
                except OSError:
                    time.sleep(0.1)
            for beams in (1, 4):
                post(f"{url}/v1/translate", {"text": SENTENCES[:2], "num_beams": beams})
                started = time.perf_counter()
                post(f"{url}/v1/translate", {"text": SENTENCES, "num_beams": beams})
                rows[("infergate", beams)] = len(SENTENCES) / (time.perf_counter() - started)
        finally:
            server.terminate()
            server.wait()
        tokenizer = transformers.MarianTokenizer.from_pretrained(model_dir)
        model = transformers.MarianMTModel.from_pretrained(model_dir).eval()
        batch = tokenizer(SENTENCES, return_tensors="pt", padding=True)
        with torch.no_grad():
            for beams in (1, 4):
                model.generate(**tokenizer(SENTENCES[:2], return_tensors="pt", padding=True), num_beams=beams)
                started = time.perf_counter()
                model.generate(**batch, num_beams=beams)
                rows[("transformers", beams)] = len(SENTENCES) / (time.perf_counter() - started)
        params = sum(p.numel() for p in model.parameters())
    finally:
        shutil.rmtree(work)
    print(f"MarianMT, {params / 1e6:.1f}M parameters, float32, CPU, torch threads={threads}, "
          f"{os.cpu_count()} cores, {len(SENTENCES)} sentences per request, max_length 32")
    print(f"{'server':<13} {'beams':>5} {'sentences/s':>12}")
    for (name, beams), rate in sorted(rows.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        print(f"{name:<13} {beams:>5} {rate:>12.1f}")
    for beams in (1, 4):
        print(f"{beams} beam(s): infergate/transformers = {rows[('infergate', beams)] / rows[('transformers', beams)]:.2f}x")


if __name__ == "__main__":
    main()
