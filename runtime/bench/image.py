"""Text-to-image benchmark: infergate-runtime against diffusers' StableDiffusionPipeline on the
same randomly initialised pipeline, device, precision and torch threads. Run through image.sh
(CPU), or directly on a GPU machine:

    python runtime/bench/image.py BINARY FIXTURE_DIR THREADS [--size small|sd15] [--device cuda]
        [--dtype float16]

`--size sd15` makes Stable Diffusion 1.5's shapes (UNet 860M parameters, CLIP ViT-L/14 text
encoder, the full VAE) at 512×512; `small` (the default, for CPUs) a UNet of 128-256-512
channels at 256×256. The tokenizer is the parity fixture's. Both sides run the DDIM scheduler
with guidance 7.5 (two UNet rows per step), N and 2N steps; the difference divided by N is the
time of one denoising step, apart from the fixed text-encoding and decoding time, which is
reported too.
"""
import argparse
import base64
import json
import os
import pathlib
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
import urllib.request

import diffusers
import torch
import transformers


def make_pipeline(out: pathlib.Path, fixture: pathlib.Path, size: str) -> int:
    torch.manual_seed(0)
    if size == "sd15":
        unet = diffusers.UNet2DConditionModel(cross_attention_dim=768, sample_size=64)
        vae = diffusers.AutoencoderKL(
            block_out_channels=[128, 256, 512, 512], latent_channels=4,
            down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
            layers_per_block=2, sample_size=512)
        text = transformers.CLIPTextConfig(hidden_size=768, intermediate_size=3072,
                                           num_attention_heads=12, num_hidden_layers=12)
        pixels = 512
    else:
        unet = diffusers.UNet2DConditionModel(
            block_out_channels=(128, 256, 512), layers_per_block=1, cross_attention_dim=256,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            sample_size=32)
        vae = diffusers.AutoencoderKL(
            block_out_channels=[64, 128, 256, 256], latent_channels=4,
            down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
            layers_per_block=1)
        text = transformers.CLIPTextConfig(hidden_size=256, intermediate_size=1024,
                                           num_attention_heads=4, num_hidden_layers=4)
        pixels = 256
    tokenizer = transformers.CLIPTokenizer.from_pretrained(fixture / "tokenizer")
    text.vocab_size = len(tokenizer)
    text.bos_token_id, text.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    text.pad_token_id = tokenizer.pad_token_id
    text_encoder = transformers.CLIPTextModel(text)
    scheduler = diffusers.DDIMScheduler.from_pretrained(fixture / "scheduler")
    pipe = diffusers.StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out)
    shutil.copytree(fixture / "tokenizer", out / "tokenizer", dirs_exist_ok=True)
    return pixels


def timed(fn, repeats: int) -> float:
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
    parser.add_argument("--size", choices=["small", "sd15"], default="small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = pathlib.Path(tempfile.mkdtemp())
    n = args.steps
    rows = {}
    try:
        model_dir = work / "pipeline"
        pixels = make_pipeline(model_dir, args.fixture, args.size)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        server = subprocess.Popen(
            [args.binary, "--task", "text-to-image", "--model-dir", str(model_dir), "--listen",
             f"127.0.0.1:{port}", "--torch-threads", str(args.threads), "--dtype", args.dtype],
            env={**os.environ, "RUST_LOG": "warn"})
        url = f"http://127.0.0.1:{port}"

        def native(steps: int) -> None:
            body = json.dumps({"prompt": "a red fox in the snow", "num_inference_steps": steps,
                               "width": pixels, "height": pixels, "seed": 1,
                               "scheduler": "ddim"}).encode()
            request = urllib.request.Request(f"{url}/v1/generate-image", data=body,
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=3600) as response:
                base64.b64decode(json.loads(response.read())["image"])

        try:
            for _ in range(1200):
                try:
                    urllib.request.urlopen(f"{url}/health", timeout=1)
                    break
                except OSError:
                    time.sleep(0.5)
            native(1)
            rows["infergate"] = (timed(lambda: native(n), args.repeats),
                                 timed(lambda: native(2 * n), args.repeats))
        finally:
            server.terminate()
            server.wait()
        dtype = getattr(torch, args.dtype)
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(
            model_dir, torch_dtype=dtype, safety_checker=None, requires_safety_checker=False)
        pipe = pipe.to(args.device)
        pipe.set_progress_bar_config(disable=True)

        def reference(steps: int) -> None:
            generator = torch.Generator().manual_seed(1)
            pipe("a red fox in the snow", num_inference_steps=steps, height=pixels, width=pixels,
                 generator=generator, output_type="np")
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()

        reference(1)
        rows["diffusers"] = (timed(lambda: reference(n), args.repeats),
                             timed(lambda: reference(2 * n), args.repeats))
        params = sum(p.numel() for p in pipe.unet.parameters())
    finally:
        shutil.rmtree(work)
    print(f"Stable Diffusion ({args.size}), UNet {params / 1e6:.0f}M parameters, {args.dtype}, "
          f"{pixels}x{pixels}, DDIM, guidance 7.5, device {args.device}, torch threads="
          f"{args.threads}, {os.cpu_count()} cores; {n} and {2 * n} steps, median of {args.repeats}")
    print(f"{'pipeline':<10} {'s/step':>8} {'fixed s':>8}")
    per_step = {}
    for name, (short, long) in rows.items():
        per_step[name] = (long - short) / n
        print(f"{name:<10} {per_step[name]:>8.3f} {short - n * per_step[name]:>8.3f}")
    print(f"per denoising step: infergate is {per_step['diffusers'] / per_step['infergate']:.2f}x "
          "diffusers' speed")


if __name__ == "__main__":
    main()
