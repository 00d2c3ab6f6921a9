"""Text-generation benchmark: infergate-runtime against Hugging Face transformers `generate` on the
same model and torch threads, at 1 and 16 concurrent streams. Run through generate.sh.

The model is a randomly initialised Llama of a few tens of millions of parameters (big enough
that the forward pass, not HTTP, dominates; random weights do not change the cost), made here
with transformers and the tiny fixture's tokenizer. Every stream asks for exactly NEW_TOKENS
tokens (EOS ignored), so both sides do the same work.

- transformers: `model.generate` on the prompts as one padded batch (its static batching);
  TTFT is the time of a generate call with max_new_tokens=1 on the same batch.
- infergate: N concurrent streaming `/v1/completions` requests over HTTP with the OpenAI
  Python client; TTFT is each stream's time to its first text chunk.
"""
import asyncio
import json
import os
import pathlib
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

import openai
import torch
import transformers

NEW_TOKENS = int(os.environ.get("NEW_TOKENS", "128"))
PROMPT = "Once upon a time, a small model learned to write short stories. The capital of France is"


def make_model(out: pathlib.Path, fixture: pathlib.Path) -> None:
    torch.manual_seed(0)
    tokenizer_vocab = json.loads((fixture / "config.json").read_text())["vocab_size"]
    config = transformers.LlamaConfig(
        vocab_size=tokenizer_vocab, hidden_size=768, intermediate_size=2048, num_hidden_layers=8,
        num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=2048,
        bos_token_id=0, eos_token_id=5, tie_word_embeddings=False,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    for name in ["tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"]:
        shutil.copy(fixture / name, out / name)


def bench_transformers(model_dir: pathlib.Path, streams: int) -> dict:
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    batch = tokenizer([PROMPT] * streams, return_tensors="pt", padding=True)
    kwargs = dict(do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
    with torch.no_grad():
        model.generate(**batch, max_new_tokens=4, min_new_tokens=4, **kwargs)  # warm up
        started = time.perf_counter()
        model.generate(**batch, max_new_tokens=1, min_new_tokens=1, **kwargs)
        ttft = time.perf_counter() - started
        started = time.perf_counter()
        out = model.generate(**batch, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, **kwargs)
        took = time.perf_counter() - started
    generated = (out.shape[1] - batch["input_ids"].shape[1]) * streams
    return {"tokens_per_s": generated / took, "ttft_p50_ms": ttft * 1000}


async def one_stream(client: openai.AsyncOpenAI) -> tuple:
    started = time.perf_counter()
    first = None
    stream = await client.completions.create(
        model="bench", prompt=PROMPT, max_tokens=NEW_TOKENS, temperature=0, stream=True,
        extra_body={"ignore_eos": True},
    )
    async for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].text:
            first = time.perf_counter() - started
    return first or (time.perf_counter() - started), time.perf_counter() - started


async def bench_infergate(url: str, streams: int) -> dict:
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", timeout=600, max_retries=0)
    await one_stream(client)  # warm up
    started = time.perf_counter()
    results = await asyncio.gather(*(one_stream(client) for _ in range(streams)))
    took = time.perf_counter() - started
    await client.close()
    return {
        "tokens_per_s": NEW_TOKENS * streams / took,
        "ttft_p50_ms": statistics.median(r[0] for r in results) * 1000,
    }


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


def main() -> None:
    binary, fixture, threads = sys.argv[1], pathlib.Path(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(threads)
    work = pathlib.Path(tempfile.mkdtemp())
    try:
        model_dir = work / "bench-llama"
        make_model(model_dir, fixture)
        params = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_pretrained(model_dir).parameters())
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        server = subprocess.Popen(
            [binary, "--task", "text-generation", "--model-dir", str(model_dir), "--listen", f"127.0.0.1:{port}",
             "--torch-threads", str(threads), "--max-sequence-tokens", "1024"],
            env={**os.environ, "RUST_LOG": "warn"},
        )
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(600):
                if healthy(url):
                    break
                time.sleep(0.1)
            rows = {}
            for streams in (1, 16):
                rows[("infergate", streams)] = asyncio.run(bench_infergate(url, streams))
        finally:
            server.terminate()
            server.wait()
        for streams in (1, 16):
            rows[("transformers", streams)] = bench_transformers(model_dir, streams)
    finally:
        shutil.rmtree(work)

    print(f"Llama, {params / 1e6:.1f}M parameters, float32, CPU, torch threads={threads}, "
          f"{os.cpu_count()} cores, {NEW_TOKENS} new tokens per stream (EOS ignored)")
    print(f"{'server':<13} {'streams':>7} {'tokens/s':>9} {'TTFT p50 ms':>12}")
    for (name, streams), r in sorted(rows.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        print(f"{name:<13} {streams:>7} {r['tokens_per_s']:>9.1f} {r['ttft_p50_ms']:>12.1f}")
    for streams in (1, 16):
        native, reference = rows[("infergate", streams)], rows[("transformers", streams)]
        print(f"{streams} stream(s): tokens/s infergate/transformers = "
              f"{native['tokens_per_s'] / reference['tokens_per_s']:.2f}x, "
              f"TTFT infergate/transformers = {native['ttft_p50_ms'] / reference['ttft_p50_ms']:.2f}x")


if __name__ == "__main__":
    main()
