"""Decode speed at GPU scale: infergate-runtime against transformers `generate` on a randomly
initialised Llama-3-8B-shaped model in bfloat16, beside the device's measured memory bandwidth.

    python runtime/bench/decode_gpu.py BINARY [--size 8b|tiny] [--new-tokens 256]

BINARY is a CUDA-linked infergate-runtime (docker/Dockerfile's runtime-cuda stage, or a CPU
build relinked against libtorch_cuda), with torch's lib/ on LD_LIBRARY_PATH. `--size tiny`
runs the same steps on a few-million-parameter model (on the CPU when there is no GPU), to
check the script itself.

The model: hidden 4096, intermediate 14336, 32 layers, 32 heads, 8 key/value heads, as
Llama-3-8B, with the tiny fixture's tokenizer and so its small vocabulary (the 128k-row
embedding and head of the real model would add 1 GB to the 14 GB read per step; the figures
below count the weights this model has). Weights are drawn on the device and saved as
safetensors.

Batch-1 decode reads every weight once per step, so its limit is (weight bytes per step) /
(memory bandwidth). Decode rates exclude the prompt: each configuration runs twice, with
SHORT and LONG new tokens (EOS ignored), and the rate is the difference in tokens over the
difference in time. Printed: the device's copy and read bandwidth (torch), decode tokens/s of
transformers at batch 1 and 32 and of infergate over HTTP at 1, 8 and 32 concurrent streams,
the weight bandwidth each implies as a share of the measured read bandwidth and of the
datasheet figure, per-stream step latency against the solo one, and the ratios.
"""
import argparse
import asyncio
import json
import os
import pathlib
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request

import openai
import torch
import transformers

REPO = pathlib.Path(__file__).resolve().parents[2]
FIXTURE = REPO / "runtime" / "fixtures" / "llama"
PROMPT = "Once upon a time, a small model learned to write short stories. The capital of France is"
# Datasheet memory bandwidth, bytes/s, by the name torch reports.
DATASHEET = {"H200": 4.8e12, "H100 80GB HBM3": 3.35e12, "H100 PCIe": 2.0e12, "H100 NVL": 3.9e12, "A100": 2.0e12}
SHAPES = {
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8),
    "tiny": dict(hidden_size=256, intermediate_size=896, num_hidden_layers=4,
                 num_attention_heads=8, num_key_value_heads=2),
}


def device_bandwidth(device: torch.device) -> dict:
    """Copy (read + write) and read-only bandwidth over a 1 GiB buffer, best of several runs."""
    elements = (1 << 30) // 2 if device.type == "cuda" else (1 << 26) // 2
    src = torch.empty(elements, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    bytes_ = src.numel() * src.element_size()

    def best(run, moved: int) -> float:
        times = []
        for _ in range(10):
            sync(device)
            started = time.perf_counter()
            run()
            sync(device)
            times.append(time.perf_counter() - started)
        return moved / min(times[2:])

    copy = best(lambda: dst.copy_(src), 2 * bytes_)
    read = best(lambda: src.sum(dtype=torch.float32), bytes_)
    del src, dst
    return {"copy": copy, "read": read}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_model(out: pathlib.Path, size: str, device: torch.device) -> transformers.PreTrainedModel:
    vocab = json.loads((FIXTURE / "config.json").read_text())["vocab_size"]
    config = transformers.LlamaConfig(
        vocab_size=vocab, max_position_embeddings=2048, bos_token_id=0, eos_token_id=5,
        tie_word_embeddings=False, torch_dtype="bfloat16", **SHAPES[size],
    )
    # Built on the meta device and drawn on the target: initialising 8B parameters on the CPU
    # would take minutes.
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            model = transformers.LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default_dtype)
    model = model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.fill_(1.0)
            else:
                parameter.normal_(0.0, 0.02, generator=generator)
    # The rotary frequencies are computed, not drawn: made again on the device.
    model.model.rotary_emb = type(model.model.rotary_emb)(config).to(device)
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    for name in ["tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"]:
        shutil.copy(FIXTURE / name, out / name)
    return model


def weight_bytes_per_step(model: transformers.PreTrainedModel) -> int:
    """Bytes a decode step reads: every weight but the embedding, of which it reads one row."""
    embedding = model.get_input_embeddings().weight
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return total - embedding.numel() * embedding.element_size()


def transformers_decode(model, tokenizer, batch: int, short: int, long: int, device) -> dict:
    inputs = tokenizer([PROMPT] * batch, return_tensors="pt").to(device)
    kwargs = dict(do_sample=False, pad_token_id=tokenizer.eos_token_id, eos_token_id=None)

    def timed(new_tokens: int) -> float:
        sync(device)
        started = time.perf_counter()
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
        sync(device)
        return time.perf_counter() - started

    timed(4)  # warm-up: kernels, allocator
    t_short, t_long = timed(short), timed(long)
    step = (t_long - t_short) / (long - short)
    return {"tokens_per_s": batch / step, "step_ms": step * 1000}


async def one_stream(client: openai.AsyncOpenAI, new_tokens: int) -> float:
    started = time.perf_counter()
    stream = await client.completions.create(
        model="bench", prompt=PROMPT, max_tokens=new_tokens, temperature=0, stream=True,
        extra_body={"ignore_eos": True},
    )
    async for _ in stream:
        pass
    return time.perf_counter() - started


async def infergate_decode(url: str, streams: int, short: int, long: int) -> dict:
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", timeout=900, max_retries=0)
    await one_stream(client, 4)  # warm-up

    async def wave(new_tokens: int) -> float:
        started = time.perf_counter()
        await asyncio.gather(*(one_stream(client, new_tokens) for _ in range(streams)))
        return time.perf_counter() - started

    t_short, t_long = await wave(short), await wave(long)
    await client.close()
    step = (t_long - t_short) / (long - short)
    return {"tokens_per_s": streams / step, "step_ms": step * 1000}


def start_runtime(binary: str, model_dir: pathlib.Path, size: str) -> tuple:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    args = [binary, "--task", "text-generation", "--model-dir", str(model_dir), "--listen", f"127.0.0.1:{port}",
            "--max-running-sequences", "32", "--max-sequence-tokens", "512", "--max-concurrent-requests", "64"]
    if torch.cuda.is_available():
        args += ["--dtype", "bfloat16"]
    process = subprocess.Popen(args, env={**os.environ, "RUST_LOG": "warn"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"infergate-runtime exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1) as response:
                if response.status == 200:
                    with urllib.request.urlopen(f"{url}/info", timeout=5) as info:
                        return process, url, json.loads(info.read())
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit("infergate-runtime did not become healthy within 300 s")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("binary")
    parser.add_argument("--size", choices=sorted(SHAPES), default="8b")
    parser.add_argument("--new-tokens", type=int, default=256)
    args = parser.parse_args()
    long, short = args.new_tokens, max(args.new_tokens // 4, 2)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    began = time.perf_counter()

    bandwidth = device_bandwidth(device)
    work = pathlib.Path(tempfile.mkdtemp())
    try:
        model_dir = work / f"llama-{args.size}"
        model = make_model(model_dir, args.size, device)
        params = sum(p.numel() for p in model.parameters())
        per_step = weight_bytes_per_step(model)
        made = time.perf_counter() - began
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
        rows = {}
        for batch in (1, 32):
            rows[("transformers", batch)] = transformers_decode(model, tokenizer, batch, short, long, device)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()

        process, url, info = start_runtime(args.binary, model_dir, args.size)
        try:
            for streams in (1, 8, 32):
                rows[("infergate", streams)] = asyncio.run(infergate_decode(url, streams, short, long))
        finally:
            process.terminate()
            process.wait()
    finally:
        shutil.rmtree(work)

    datasheet = next((v for k, v in DATASHEET.items() if k in device_name), None)
    print(f"{device_name}; Llama-3-8B shape ({args.size}), {params / 1e6:,.1f}M parameters, bfloat16, "
          f"vocabulary {tokenizer.vocab_size} (the fixture's); {per_step / 1e9:.2f} GB of weights read per step")
    print(f"runtime /info: {json.dumps(info)}")
    print(f"bandwidth: copy {bandwidth['copy'] / 1e9:.0f} GB/s, read {bandwidth['read'] / 1e9:.0f} GB/s"
          + (f", datasheet {datasheet / 1e9:.0f} GB/s" if datasheet else ""))
    print(f"decode rates from {short} and {long} new tokens (EOS ignored); setup {made:.0f} s, "
          f"total {time.perf_counter() - began:.0f} s")
    print(f"{'engine':<13} {'streams':>7} {'tokens/s':>9} {'step ms':>8} {'read BW %':>9} {'datasheet %':>11}")
    for (engine, streams), r in rows.items():
        implied = per_step / (r["step_ms"] / 1000)
        sheet = f"{100 * implied / datasheet:.0f}" if datasheet else "-"
        print(f"{engine:<13} {streams:>7} {r['tokens_per_s']:>9.1f} {r['step_ms']:>8.2f} "
              f"{100 * implied / bandwidth['read']:>9.0f} {sheet:>11}")
    solo = rows[("infergate", 1)]
    for streams in (1, 32):
        reference = rows[("transformers", streams)]
        print(f"infergate/transformers at {streams}: {rows[('infergate', streams)]['tokens_per_s'] / reference['tokens_per_s']:.2f}x")
    print(f"infergate 32 streams / 1 stream: {rows[('infergate', 32)]['tokens_per_s'] / solo['tokens_per_s']:.1f}x tokens/s, "
          f"step latency {rows[('infergate', 32)]['step_ms'] / solo['step_ms']:.2f}x the solo one")


if __name__ == "__main__":
    main()
