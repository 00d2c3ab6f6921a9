"""GPU check: a CUDA build of infergate-runtime against the transformers references stored with the
parity fixtures (computed on CPU). Run on a machine with a GPU, from the repository root:

    python runtime/bench/gpu_check.py BINARY

BINARY must be linked against libtorch_cuda (docker/Dockerfile's runtime-cuda stage, or a CPU
build with `patchelf --add-needed libtorch_cuda.so`), with torch's lib/ on LD_LIBRARY_PATH.
Each check starts the runtime on a fixture, asserts `/info` reports a CUDA device, and compares
answers over HTTP: embeddings (max |Δ| ≤ 1e-3), greedy completions of the tiny Llama (the same
text), Whisper's greedy transcription (the same text), VITS's noiseless waveform (≤ 1e-3), and a
seeded Stable Diffusion image in float32 against the CPU's (`.device/image-cpu-seed1.rgb`, made
by this repository's CPU build; ≤ 2/255) and in float16 (reproducible). Prints one line per
check and exits non-zero when one fails.
"""
import json
import os
import pathlib
import socket
import subprocess
import sys
import time
import urllib.request

REPO = pathlib.Path(__file__).resolve().parents[2]
FIXTURES = REPO / "runtime" / "fixtures"


class Runtime:
    def __init__(self, binary: str, task: str, fixture: str):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        sock.close()
        self.process = subprocess.Popen(
            [binary, "--task", task, "--model-dir", str(FIXTURES / fixture),
             "--listen", self.url.removeprefix("http://")],
            env={**os.environ, "RUST_LOG": "warn"})
        for _ in range(600):
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        self.info = json.loads(urllib.request.urlopen(f"{self.url}/info").read())

    def post(self, path: str, body: bytes, content_type: str = "application/json"):
        request = urllib.request.Request(f"{self.url}{path}", data=body,
                                         headers={"Content-Type": content_type})
        with urllib.request.urlopen(request, timeout=300) as response:
            return json.loads(response.read())

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.process.terminate()
        self.process.wait()


def check_embeddings(binary: str) -> str:
    reference = json.loads((FIXTURES / "bert-mean" / "reference.json").read_text())
    with Runtime(binary, "embedding", "bert-mean") as runtime:
        got = runtime.post("/embed", json.dumps(
            {"inputs": reference["inputs"], "normalize": False}).encode())
        device = runtime.info["device"]
    delta = max(abs(a - b) for row, ref in zip(got, reference["embeddings"])
                for a, b in zip(row, ref))
    assert device.startswith("cuda"), f"runtime on {device}"
    assert delta <= 1e-3, f"max |Δ| {delta:.2e}"
    return f"{device}, {len(got)} inputs, max |Δ| {delta:.2e}"


def check_generation(binary: str) -> str:
    reference = json.loads((FIXTURES / "llama" / "reference.json").read_text())
    with Runtime(binary, "text-generation", "llama") as runtime:
        texts = [runtime.post("/v1/completions", json.dumps(
            {"prompt": prompt, "max_tokens": len(ids), "temperature": 0}).encode())
            ["choices"][0]["text"] for prompt, ids in zip(reference["prompts"], reference["greedy"])]
        device = runtime.info["device"]
    assert device.startswith("cuda"), f"runtime on {device}"
    same = sum(a == b for a, b in zip(texts, reference["greedy_text"]))
    assert same == len(texts), f"{same}/{len(texts)} greedy completions equal: {texts}"
    return f"{device}, {same}/{len(texts)} greedy completions of 64 tokens equal"


def check_speech(binary: str) -> str:
    import tokenizers

    reference = json.loads((FIXTURES / "whisper" / "reference.json").read_text())
    tokenizer = tokenizers.Tokenizer.from_file(str(FIXTURES / "whisper" / "tokenizer.json"))
    end_of_text = tokenizer.token_to_id("<|endoftext|>")
    # transformers' 24 greedy tokens after the 4 prompt tokens; the runtime decodes on to the
    # end of the window, so their text must begin its transcript.
    expected = tokenizer.decode([t for t in reference["greedy"]["ids"][4:] if t < end_of_text])
    boundary = "gpu-check"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"language\"\r\n\r\nen\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            "filename=\"clip.wav\"\r\n\r\n").encode()
    body += (FIXTURES / "whisper" / "clip.wav").read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    with Runtime(binary, "speech-recognition", "whisper") as runtime:
        text = runtime.post("/v1/audio/transcriptions", body,
                            f"multipart/form-data; boundary={boundary}")["text"]
        device = runtime.info["device"]
    assert device.startswith("cuda"), f"runtime on {device}"
    assert text.startswith(expected.strip()), f"{text[:80]!r} does not start with {expected!r}"
    return f"{device}, transcript starts with transformers' {len(expected)}-character greedy text"


def check_speech_synthesis(binary: str) -> str:
    import base64
    import io
    import wave

    import numpy
    import safetensors.numpy

    expected = safetensors.numpy.load_file(str(FIXTURES / "vits" / "reference.safetensors"))["quiet"]
    reference = json.loads((FIXTURES / "vits" / "reference.json").read_text())
    with Runtime(binary, "text-to-speech", "vits") as runtime:
        answer = runtime.post("/v1/generate-speech", json.dumps(
            {"text": reference["sentence"], "noise_scale": 0, "noise_scale_duration": 0}).encode())
        device = runtime.info["device"]
    with wave.open(io.BytesIO(base64.b64decode(answer["audio"]))) as audio:
        samples = numpy.frombuffer(audio.readframes(audio.getnframes()), "<i2") / 32767.0
    assert device.startswith("cuda"), f"runtime on {device}"
    assert len(samples) == len(expected), f"{len(samples)} samples, transformers {len(expected)}"
    delta = float(numpy.abs(samples - expected).max())
    assert delta <= 1e-3, f"max |Δ| {delta:.2e}"
    return f"{device}, {len(samples)} samples, max |Δ| {delta:.2e} (16-bit WAV vs float)"


def check_image(binary: str) -> str:
    """The same seed on the GPU (float32) as on this repository's CPU run, and in float16 a
    valid image that the seed reproduces."""
    import base64

    import numpy

    expected = numpy.frombuffer(
        (REPO / ".device" / "image-cpu-seed1.rgb").read_bytes(), numpy.uint8).astype(int)
    body = json.dumps({"prompt": "a red fox in the snow", "num_inference_steps": 2, "seed": 1,
                       "width": 32, "height": 32, "scheduler": "ddim"}).encode()

    def pixels(runtime) -> numpy.ndarray:
        import zlib
        png = base64.b64decode(runtime.post("/v1/generate-image", body)["image"])
        at, data = 8, b""
        while at < len(png):
            length = int.from_bytes(png[at:at + 4], "big")
            if png[at + 4:at + 8] == b"IDAT":
                data += png[at + 8:at + 8 + length]
            at += 12 + length
        rows = zlib.decompress(data)
        return numpy.frombuffer(b"".join(rows[i * 97 + 1:(i + 1) * 97] for i in range(32)),
                                numpy.uint8).astype(int)

    os.environ["INFERGATE_DTYPE"] = "float32"
    with Runtime(binary, "text-to-image", "stable-diffusion") as runtime:
        full = pixels(runtime)
        device = runtime.info["device"]
    del os.environ["INFERGATE_DTYPE"]
    with Runtime(binary, "text-to-image", "stable-diffusion") as runtime:
        half, again, dtype = pixels(runtime), pixels(runtime), runtime.info["model_dtype"]
    assert device.startswith("cuda"), f"runtime on {device}"
    delta = int(numpy.abs(full - expected).max())
    assert delta <= 2, f"float32 GPU vs CPU: max |Δ| {delta}/255"
    assert dtype == "float16", dtype
    assert (half == again).all(), "float16: the seed does not reproduce the image"
    half_delta = int(numpy.abs(half - expected).max())
    return (f"{device}, float32 vs CPU max |Δ| {delta}/255; float16 reproducible, "
            f"vs CPU float32 max |Δ| {half_delta}/255")


def main() -> None:
    binary = sys.argv[1]
    failed = 0
    for check in (check_embeddings, check_generation, check_speech, check_speech_synthesis,
                  check_image):
        try:
            print(f"PASS {check.__name__}: {check(binary)}", flush=True)
        except Exception as error:  # noqa: BLE001 - every failure is reported, then counted
            failed += 1
            print(f"FAIL {check.__name__}: {error}", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
