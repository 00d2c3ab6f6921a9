"""Speech-recognition benchmark: infergate-runtime against transformers on the same Whisper model,
device and torch threads. Run through speech.sh (CPU), or directly on a GPU machine:

    python runtime/bench/speech.py BINARY FIXTURE_DIR THREADS [--size tiny|fixture] [--device cuda]

`--size tiny` (the default) makes a randomly initialised model of whisper-tiny's shape (d_model
384, 4+4 layers, 6 heads, 80 mel bins, a 51.8k vocabulary); `fixture` uses the parity fixture.
Both sides transcribe the same 30-second clip in English with greedy decoding and no
timestamps, one window, up to the decoder's 448 positions (random weights rarely end early, and
the two sides generate the same ids), alone and four at once (infergate: four concurrent
requests, batched by the runtime; transformers: one `generate` call on a batch of four).
`--dtype float16` runs both sides in half precision (CUDA only).
Reported: seconds per request and the real-time factor (processing time / audio time; below 1
is faster than real time), and infergate/transformers speed ratios.
"""
import argparse
import concurrent.futures
import io
import json
import math
import os
import pathlib
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
import urllib.request
import wave

import numpy as np
import tokenizers
import torch
import transformers

CLIP_SECONDS = 30.0
LANGUAGES = ["en", "de", "fr"]


def clip() -> np.ndarray:
    t = np.arange(int(CLIP_SECONDS * 16000)) / 16000
    chirp = 0.3 * np.sin(2 * math.pi * (200 * t + 40 * t * t))
    noise = 0.01 * np.random.default_rng(3).standard_normal(t.shape)
    return (chirp + noise).astype(np.float32)


def wav_bytes(samples: np.ndarray) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return out.getvalue()


def make_tiny_model(out: pathlib.Path) -> None:
    """whisper-tiny's shape with random weights, and a tokenizer of its vocabulary size."""
    out.mkdir(parents=True)
    alphabet = tokenizers.pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: i for i, symbol in enumerate(sorted(alphabet))}
    for i in range(len(vocab), 50257):
        vocab[f"Ġw{i}"] = i
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    specials = (["<|endoftext|>", "<|startoftranscript|>"] + [f"<|{lang}|>" for lang in LANGUAGES]
                + ["<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>",
                   "<|nospeech|>", "<|notimestamps|>"])
    tokenizer.add_special_tokens([tokenizers.AddedToken(s, special=True) for s in specials])
    tokenizer.add_tokens([tokenizers.AddedToken(f"<|{i * 0.02:.2f}|>", special=False)
                          for i in range(1501)])
    tokenizer.save(str(out / "tokenizer.json"))
    tid = tokenizer.token_to_id
    eot, sot = tid("<|endoftext|>"), tid("<|startoftranscript|>")
    torch.manual_seed(0)
    config = transformers.WhisperConfig(
        vocab_size=tokenizer.get_vocab_size(), num_mel_bins=80, d_model=384, encoder_layers=4,
        encoder_attention_heads=6, encoder_ffn_dim=1536, decoder_layers=4, decoder_attention_heads=6,
        decoder_ffn_dim=1536, max_source_positions=1500, max_target_positions=448,
        decoder_start_token_id=sot, eos_token_id=eot, bos_token_id=eot, pad_token_id=eot)
    model = transformers.WhisperForConditionalGeneration(config)
    model.generation_config = transformers.GenerationConfig(
        decoder_start_token_id=sot, eos_token_id=eot, pad_token_id=eot, bos_token_id=eot,
        max_length=448, is_multilingual=True,
        lang_to_id={f"<|{lang}|>": tid(f"<|{lang}|>") for lang in LANGUAGES},
        task_to_id={"transcribe": tid("<|transcribe|>"), "translate": tid("<|translate|>")},
        no_timestamps_token_id=tid("<|notimestamps|>"), max_initial_timestamp_index=50,
        begin_suppress_tokens=[eot])
    model.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    transformers.WhisperFeatureExtractor(feature_size=80).save_pretrained(out)


def free_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


def transcribe(url: str, audio: bytes) -> str:
    boundary = "infergate-bench"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"language\"\r\n\r\nen\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n"
            "Content-Type: audio/wav\r\n\r\n").encode() + audio + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(f"{url}/v1/transcript", data=body, headers={
        "Content-Type": f"multipart/form-data; boundary={boundary}"})
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.loads(response.read())["text"]


def timed(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("binary")
    parser.add_argument("fixture", type=pathlib.Path)
    parser.add_argument("threads", type=int)
    parser.add_argument("--size", choices=["tiny", "fixture"], default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = pathlib.Path(tempfile.mkdtemp())
    samples = clip()
    audio = wav_bytes(samples)
    rows = {}
    try:
        model_dir = args.fixture
        if args.size == "tiny":
            model_dir = work / "whisper-tiny-random"
            make_tiny_model(model_dir)
        port = free_port()
        server = subprocess.Popen(
            [args.binary, "--task", "speech-recognition", "--model-dir", str(model_dir),
             "--listen", f"127.0.0.1:{port}", "--torch-threads", str(args.threads),
             "--dtype", args.dtype],
            env={**os.environ, "RUST_LOG": "warn"})
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(1200):
                try:
                    urllib.request.urlopen(f"{url}/health", timeout=1)
                    break
                except OSError:
                    time.sleep(0.1)
            info = json.loads(urllib.request.urlopen(f"{url}/info").read())
            rows[("infergate", 1)] = timed(lambda: transcribe(url, audio), args.repeats)
            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                rows[("infergate", 4)] = timed(
                    lambda: list(pool.map(lambda _: transcribe(url, audio), range(4))), args.repeats)
        finally:
            server.terminate()
            server.wait()
        extractor = transformers.WhisperFeatureExtractor.from_pretrained(model_dir)
        model = transformers.WhisperForConditionalGeneration.from_pretrained(model_dir).eval()
        dtype = getattr(torch, args.dtype)
        model = model.to(args.device, dtype)

        def reference(batch: int) -> None:
            features = extractor([samples] * batch, sampling_rate=16000, return_tensors="pt")
            with torch.no_grad():
                model.generate(features.input_features.to(args.device, dtype), language="en",
                               task="transcribe", force_unique_generate_call=True)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()

        rows[("transformers", 1)] = timed(lambda: reference(1), args.repeats)
        rows[("transformers", 4)] = timed(lambda: reference(4), args.repeats)
        params = sum(p.numel() for p in model.parameters())
    finally:
        shutil.rmtree(work)
    print(f"Whisper ({args.size}), {params / 1e6:.1f}M parameters, {args.dtype}, runtime device "
          f"{info['device']}, transformers device {args.device}, torch threads={args.threads}, "
          f"{os.cpu_count()} cores, {CLIP_SECONDS:.0f} s clip, greedy, no timestamps")
    print(f"{'server':<13} {'requests':>8} {'s/request':>10} {'RTF':>7}")
    for (name, batch), seconds in sorted(rows.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        per_request = seconds / batch
        print(f"{name:<13} {batch:>8} {per_request:>10.3f} {per_request / CLIP_SECONDS:>7.4f}")
    for batch in (1, 4):
        ratio = rows[("transformers", batch)] / rows[("infergate", batch)]
        print(f"{batch} at once: infergate is {ratio:.2f}x transformers' speed")


if __name__ == "__main__":
    main()
