"""Admission benchmark: whether infergate-runtime refuses only what it cannot serve in time.
Side by side in one run for each binary given (the current one, and with --before an older one
to compare against), each with its default admission:

1. bursts of N simultaneous requests at an idle model (rested a second), N = 2, 3, 8, 32 and,
   for text generation, --max-running-sequences: how many were refused;
2. the capacity X (closed-loop clients; one refused with 429 pauses 10 ms), then 2X open loop
   for --overload-seconds (30): the share refused, the 429 p99, the accepted p99, how many
   accepted requests waited for their pass no longer than the maximum queue time (the bound
   admission keeps, from the runtime's own histogram, so the capacity phase before is
   counted too) and every other outcome (which must be none); what was accepted per second
   then is the capacity the model sustains under open-loop arrivals, S;
3. Poisson arrivals at 0.5 S and 0.8 S: the share refused and the accepted p99;
4. with --up INFERGATE, the story of the issue: through `infergate up` (its proxy in front of
   the binary), an application's batch call of three chat requests at once with the official
   OpenAI client (retries off, so that a 429 shows), rounds of it at an idle tiny chat model.

    . scripts/env.sh && python runtime/bench/admission.py BINARY MINILM_DIR [--before OLD_BINARY]
        [--up target/release/infergate] [--while "cargo build ..."]
    python runtime/bench/admission.py BINARY LLAMA_DIR --generate 32   # text generation

The request is `--inputs` rows of `--ids` token ids to /embed, so no tokenizer time is measured;
with `--generate N`, a TGI-style /generate of N greedy tokens (`ignore_eos`) of a fixed prompt.
Each request goes on a fresh connection (scripts/reliability.py's client). `--while CMD` runs
CMD (for instance a cargo build) in the background for the whole measurement, restarted
whenever it ends: a noisy neighbour on the same cores.
"""
import argparse
import asyncio
import concurrent.futures
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import reliability  # noqa: E402  (the overload scenario and its HTTP client)

REPO = Path(__file__).resolve().parents[2]
BURSTS = [2, 3, 8, 32]


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url, what, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{what} did not become healthy")


async def measure_bursts(port, raw, sizes, rounds):
    """Per burst size: (refused, sent) over `rounds` bursts, each at a model rested a second."""
    results = {}
    for size in sizes:
        refused = sent = 0
        for _ in range(rounds):
            await asyncio.sleep(1.0)
            replies = await asyncio.gather(*(reliability.exchange(port, raw) for _ in range(size)))
            refused += sum(1 for r in replies if r.status in (429, 503))
            others = [r.status or r.error for r in replies if r.status not in (200, 429, 503)]
            if others:
                raise RuntimeError(f"a burst of {size} failed: {others[:5]}")
            sent += size
        results[size] = (refused, sent)
    return results


def request_body(args):
    if args.generate:
        body = json.dumps({"inputs": "Once upon a time, a small model learned to write",
                           "parameters": {"max_new_tokens": args.generate, "do_sample": False,
                                          "ignore_eos": True}}).encode()
        return reliability.post_json("/generate", None, body)
    body = json.dumps({"inputs": [[(1000 + (7 * i + j) % 20000) % args.vocab for j in range(args.ids)]
                                  for i in range(args.inputs)]}).encode()
    return reliability.post_json("/embed", None, body)


def queue_waits(port):
    """The runtime's histogram of how long requests waited for their pass: {le: count}."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    return {float(le): int(float(count)) for le, count in re.findall(
        r'^infergate_runtime_queue_seconds_bucket\{le="([^"]+)"\} ([0-9.e+]+)$', text.replace('"+Inf"', '"inf"'),
        re.MULTILINE)}


def run_binary(args, binary):
    port = free_port()
    task = "text-generation" if args.generate else "embedding"
    argv = [binary, "--task", task, "--model-dir", args.model_dir, "--listen", f"127.0.0.1:{port}",
            "--torch-threads", str(args.torch_threads)]
    runtime = subprocess.Popen(argv, env={**os.environ, "RUST_LOG": "warn"})
    try:
        wait_healthy(f"http://127.0.0.1:{port}/health", binary, runtime)
        raw = request_body(args)
        sizes = BURSTS + ([args.slots] if args.generate else [])
        # The first requests of a shape are slower (libtorch sizes its buffers): not counted.
        for _ in range(20):
            asyncio.run(reliability.exchange(port, raw))
        bursts = asyncio.run(measure_bursts(port, raw, sizes, args.rounds))
        waits_before = queue_waits(port)
        m = asyncio.run(reliability.measure_overload(
            port, raw, args.clients, args.unloaded, args.seconds, args.overload_seconds))
        waits = {le: n - waits_before.get(le, 0) for le, n in queue_waits(port).items()}
        info = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/info"))
        time.sleep(2)
        # What the model sustains under open-loop arrivals: closed-loop clients of equal requests
        # move in lockstep (text generation's finish together and are prefilled together),
        # which flatters the capacity they measure.
        sustained = len(m["accepted"]) / args.overload_seconds
        below = []
        for share in (0.5, 0.8):
            below.append(asyncio.run(reliability.measure_random_arrivals(
                port, raw, share * sustained, args.poisson_seconds)))
            time.sleep(2)
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    finally:
        runtime.terminate()
        runtime.wait(timeout=30)
    reasons = dict(re.findall(r'^infergate_runtime_refused_total\{reason="(\w+)"\} (\d+)$', metrics, re.MULTILINE))
    # The bound is on the wait before a request's pass starts, beyond which it is refused; the
    # runtime times that wait itself. Older binaries have no maximum queue time: a second.
    bound = info.get("max_queue_time") or 1.0
    waited = {"total": waits.get(float("inf"), 0),
              "within": max((n for le, n in waits.items() if le <= bound), default=0), "bound": bound}
    return {"bursts": bursts, "overload": m, "sustained": sustained, "below": below, "reasons": reasons,
            "waited": waited}


def ms(seconds):
    return reliability.ms(seconds)


def share(refused, total):
    return f"{refused}/{total} = {100 * refused / max(total, 1):.2f} %"


def print_rows(label, r):
    m = r["overload"]
    bursts = ", ".join(f"{n}: {refused}/{sent}" for n, (refused, sent) in r["bursts"].items())
    below = " | ".join(f"{share(b['refused'], b['total'])}, p99 {ms(b['p99_accepted'])}" for b in r["below"])
    accepted, shed = m["accepted"], m["shed"]
    other = sum(m["other"].values()) if m["other"] else 0
    print(f"| {label} | {ms(m['p99_unloaded'])} | {m['capacity']:.0f} | {r['sustained']:.0f} | {bursts} | {below} | "
          f"{share(len(shed), m['total'])} | {ms(reliability.percentile(shed, 99)) if shed else '-'} | "
          f"{ms(reliability.percentile(accepted, 99)) if accepted else '-'} | "
          f"{r['waited']['within']}/{r['waited']['total']} within {r['waited']['bound']:g} s | {other} | "
          f"{ms(m['lateness_p99'])} | "
          f"{', '.join(f'{k} {v}' for k, v in sorted(r['reasons'].items())) or '-'} |", flush=True)


def up_bursts(args, binary):
    """Rounds of three chat requests at once through `infergate up`, with the OpenAI client."""
    import openai

    work = Path(tempfile.mkdtemp(prefix="infergate-admission-up-"))
    (work / "chat.yaml").write_text(
        "apiVersion: infergate.dev/v1alpha1\nkind: ModelDeployment\nmetadata: {name: chat}\n"
        f"spec:\n  task: text-generation\n  model: {{uri: 'file://{args.up_model}'}}\n---\n"
        "apiVersion: infergate.dev/v1alpha1\nkind: AccessToken\nmetadata: {name: app}\n"
        "spec:\n  models: [chat]\n")
    port = free_port()
    log = open(work / "console.log", "w+")
    up = subprocess.Popen(
        [args.up, "up", "-f", str(work), "--listen", f"127.0.0.1:{port}",
         "--metrics-listen", f"127.0.0.1:{free_port()}", "--runtime-bin", binary,
         "--torch-threads", str(args.torch_threads)],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:
            console = (work / "console.log").read_text()
            if "chat: ready" in console and "proxy: ready" in console:
                break
            if up.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"infergate up did not get ready:\n{console}")
            time.sleep(0.2)
        heading = console.index("AccessToken default/app: new token")
        token = console[heading:].splitlines()[1].strip()
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/models/chat/proxy/v1",
                               api_key=token, max_retries=0)

        def chat(i):
            try:
                client.chat.completions.create(
                    model="chat", messages=[{"role": "user", "content": f"Tell me a story, {i}."}])
                return 200
            except openai.APIStatusError as error:
                return error.status_code

        statuses = []
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            for round_ in range(args.up_rounds):
                time.sleep(1.0)
                statuses += list(pool.map(chat, range(3 * round_, 3 * round_ + 3)))
        return statuses
    finally:
        up.send_signal(signal.SIGTERM)
        try:
            up.wait(timeout=30)
        except subprocess.TimeoutExpired:
            up.kill()
        log.close()
        shutil.rmtree(work, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("binary")
    parser.add_argument("model_dir")
    parser.add_argument("--before", help="an older infergate-runtime to measure the same way, first")
    parser.add_argument("--inputs", type=int, default=2, help="rows per request (default 2)")
    parser.add_argument("--ids", type=int, default=32, help="token ids per row (default 32)")
    parser.add_argument("--vocab", type=int, default=30522, help="ids stay below this (default BERT's 30522)")
    parser.add_argument("--generate", type=int, metavar="N", help="text generation of N tokens instead of /embed")
    parser.add_argument("--slots", type=int, default=32, help="the runtime's --max-running-sequences (default 32)")
    parser.add_argument("--clients", type=int, default=4, help="closed-loop clients for capacity (default 4)")
    parser.add_argument("--seconds", type=float, default=5, help="capacity phase (default 5)")
    parser.add_argument("--poisson-seconds", type=float, default=20, help="each Poisson phase (default 20)")
    parser.add_argument("--overload-seconds", type=float, default=30, help="the 2x phase (default 30)")
    parser.add_argument("--rounds", type=int, default=5, help="bursts of each size (default 5)")
    parser.add_argument("--unloaded", type=int, default=100, help="sequential requests for the unloaded p99")
    parser.add_argument("--torch-threads", type=int, default=1, help="libtorch threads of the runtime (default 1)")
    parser.add_argument("--up", metavar="INFERGATE", help="also run the three-request burst through `infergate up`")
    parser.add_argument("--up-model", default=str(REPO / "runtime/fixtures/llama"), help="its chat model")
    parser.add_argument("--up-rounds", type=int, default=20, help="bursts of three through it (default 20)")
    parser.add_argument("--while", dest="noise", metavar="CMD", help="a command run in the background meanwhile")
    args = parser.parse_args()

    noise = None
    stop_noise = False
    if args.noise:
        def keep_running():
            nonlocal noise
            while not stop_noise:
                noise = subprocess.Popen(args.noise, shell=True, start_new_session=True,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                noise.wait()

        import threading
        threading.Thread(target=keep_running, daemon=True).start()
        time.sleep(5)
    try:
        shape = (f"{args.generate} generated tokens" if args.generate
                 else f"{args.inputs} x {args.ids} token ids")
        print(f"{shape} per request, every request on a fresh connection; capacity from {args.clients} "
              f"closed-loop clients over {args.seconds:g} s; Poisson phases {args.poisson_seconds:g} s; "
              f"2x phase {args.overload_seconds:g} s; {args.rounds} bursts of each size; "
              f"torch threads {args.torch_threads}"
              + (f"; meanwhile: {args.noise}" if args.noise else ""))
        print()
        print("| binary | unloaded p99 | closed-loop capacity (rps) | sustained at 2x (rps) "
              "| bursts at an idle model: refused/sent "
              "| 0.5x, Poisson: refused, accepted p99 | 0.8x, Poisson: refused, accepted p99 "
              "| 2x: refused | 2x: 429 p99 | 2x: accepted p99 "
              "| 2x: waits for a pass within the maximum queue time (runtime's histogram) "
              "| 2x: other outcomes | client lateness p99 | refusals by reason, whole run |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        binaries = ([("before: " + args.before, args.before)] if args.before else []) + [(args.binary, args.binary)]
        ups = []
        for label, binary in binaries:
            print_rows(label, run_binary(args, binary))
            if args.up:
                ups.append((label, up_bursts(args, binary)))
        if ups:
            print()
            print("| binary | through `infergate up`: 3 chat requests at once (OpenAI client, no retries) |")
            print("|---|---|")
            for label, statuses in ups:
                refused = sum(1 for s in statuses if s == 429)
                others = sorted({s for s in statuses if s not in (200, 429)})
                print(f"| {label} | {share(refused, len(statuses))} refused"
                      + (f"; other statuses {others}" if others else "") + " |")
    finally:
        stop_noise = True
        if noise is not None and noise.poll() is None:
            os.killpg(noise.pid, signal.SIGTERM)


if __name__ == "__main__":
    main()
