"""Admission benchmark: infergate-runtime at twice its capacity and below it, under the default
admission (predicted slowdown <= 2x, 4x early in a busy period), without its burst allowance,
and under count limits alone, side by side in one run.

    . scripts/env.sh && python runtime/bench/admission.py BINARY MODEL_DIR [--inputs 2 --ids 32]
    python runtime/bench/admission.py BINARY LLAMA_DIR --generate 32   # text generation

For each admission setting it starts the runtime, measures the unloaded p99 (sequential
requests), the capacity (closed-loop clients; one refused with 429 pauses 10 ms), then offers
twice that capacity open-loop, each request on a fresh connection (scripts/reliability.py's
overload scenario, straight to the runtime), then half and 0.8 of that capacity at random
(Poisson) times, as independent clients arrive. Prints one Markdown row per setting: capacity,
share shed, 429 p99, accepted p99 against unloaded, the mean batch (sequences per forward pass,
from /metrics) at twice capacity, and the share shed and accepted p99 below capacity. The request is `--inputs` rows of `--ids` token ids to /embed, so no
tokenizer time is measured; with `--generate N`, a TGI-style /generate of N greedy tokens
(`ignore_eos`) of a fixed prompt, and the batch is the rows of a decode step. On a GPU (a CUDA build, see gpu_check.py) the same command shows batches filling
under the default rule, where the CPU's stay about one request deep.
"""
import argparse
import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import reliability  # noqa: E402  (the overload scenario and its HTTP client)


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def metric_sum_count(text, name):
    values = {}
    for suffix in ("sum", "count"):
        found = re.search(rf"^{name}_{suffix} (\S+)$", text, re.MULTILINE)
        values[suffix] = float(found.group(1)) if found else 0.0
    return values["sum"], values["count"]


def run_setting(args, label, flags):
    port = free_port()
    task = "text-generation" if args.generate else "embedding"
    argv = [args.binary, "--task", task, "--model-dir", args.model_dir,
            "--listen", f"127.0.0.1:{port}", *flags]
    if args.torch_threads:
        argv += ["--torch-threads", str(args.torch_threads)]
    runtime = subprocess.Popen(argv, env={**os.environ, "RUST_LOG": "warn"})
    try:
        for _ in range(1200):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        else:
            raise RuntimeError(f"{label}: the runtime did not become healthy")
        device = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/info"))["device"]
        if args.generate:
            body = json.dumps({"inputs": "Once upon a time, a small model learned to write",
                               "parameters": {"max_new_tokens": args.generate, "do_sample": False,
                                              "ignore_eos": True}}).encode()
            raw = reliability.post_json("/generate", None, body)
        else:
            body = json.dumps({"inputs": [[(1000 + (7 * i + j) % 20000) % args.vocab for j in range(args.ids)]
                                          for i in range(args.inputs)]}).encode()
            raw = reliability.post_json("/embed", None, body)
        m = asyncio.run(reliability.measure_overload(
            port, raw, args.clients, args.unloaded, args.seconds, args.seconds))
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
        rows, passes = metric_sum_count(text, "infergate_runtime_batch_size")
        below = [asyncio.run(reliability.measure_random_arrivals(
            port, raw, share * m["capacity"], args.seconds)) for share in (0.5, 0.8)]
    finally:
        runtime.terminate()
        runtime.wait(timeout=30)
    accepted, shed = m["accepted"], m["shed"]
    p99_accepted = reliability.percentile(accepted, 99)
    return (f"| {label} | {device} | {m['capacity']:.0f} | {m['offered']:.0f} | "
            f"{100 * len(shed) / m['total']:.1f} % | "
            f"{reliability.ms(reliability.percentile(shed, 99)) if shed else '-'} | "
            f"{reliability.ms(p99_accepted)} vs {reliability.ms(m['p99_unloaded'])} "
            f"(**{p99_accepted / m['p99_unloaded']:.2f}x**) | "
            f"{rows / max(passes, 1):.2f} | {sum(m['other'].values()) if m['other'] else 0} | "
            f"{reliability.ms(m['lateness_p99'])} | "
            + " | ".join(f"{100 * b['refused'] / b['total']:.1f} % shed, "
                         f"p99 {b['p99_accepted'] / m['p99_unloaded']:.2f}x" for b in below) + " |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("binary")
    parser.add_argument("model_dir")
    parser.add_argument("--inputs", type=int, default=2, help="rows per request (default 2)")
    parser.add_argument("--ids", type=int, default=32, help="token ids per row (default 32)")
    parser.add_argument("--vocab", type=int, default=30522, help="ids stay below this (default BERT's 30522)")
    parser.add_argument("--generate", type=int, metavar="N", help="text generation of N tokens instead of /embed")
    parser.add_argument("--clients", type=int, default=4, help="closed-loop clients for capacity (default 4)")
    parser.add_argument("--seconds", type=float, default=5, help="capacity and overload phases (default 5)")
    parser.add_argument("--unloaded", type=int, default=100, help="sequential requests for the unloaded p99")
    parser.add_argument("--torch-threads", type=int, default=1, help="0: the runtime's default")
    args = parser.parse_args()
    count = 128 if args.generate else 512
    settings = [
        (f"default: slowdown <= 2x (4x in a burst), {count} at once", []),
        ("no burst allowance: slowdown <= 2x", ["--burst-slowdown", "2"]),
        (f"count only: {count} at once (the default count)", ["--max-slowdown", "0"]),
        ("count only: 2 at once", ["--max-slowdown", "0", "--max-concurrent-requests", "2"]),
    ]
    shape = f"{args.generate} generated tokens" if args.generate else f"{args.inputs} x {args.ids} token ids"
    print(f"{shape} per request; capacity from {args.clients} closed-loop "
          f"clients; {args.seconds:g} s per phase; every request on a fresh connection")
    print()
    # The client is one Python thread: where its start lateness grows past a few ms it, not
    # the runtime, is the bottleneck, and the latencies it measures are its own too.
    print("| admission | device | capacity (rps) | offered (rps) | shed | 429 p99 | accepted p99 vs unloaded p99 "
          "| mean batch (seqs) | other outcomes | client lateness p99 | 0.5x capacity, Poisson "
          "| 0.8x capacity, Poisson |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for label, flags in settings:
        print(run_setting(args, label, flags), flush=True)


if __name__ == "__main__":
    main()
