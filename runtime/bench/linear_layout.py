"""Times torch's `linear` with the weight in its checkpoint layout ([out, in], contiguous) and
laid out as the transpose of a contiguous [in, out] matrix (what `models::favour_few_rows`
does), for the layer shapes of all-MiniLM-L6-v2 and the benchmark Llama, at one thread.

    python runtime/bench/linear_layout.py
"""

import time

import torch
import torch.nn.functional as F

SHAPES = {
    "MiniLM qkv": (1152, 384),
    "MiniLM ffn up": (1536, 384),
    "MiniLM ffn down": (384, 1536),
    "Llama-51M o_proj": (512, 512),
    "Llama-51M gate+up": (2752, 512),
}


def per_call_ms(fn, budget_s=0.3):
    for _ in range(10):
        fn()
    calls, started = 0, time.perf_counter()
    while time.perf_counter() - started < budget_s:
        fn()
        calls += 1
    return (time.perf_counter() - started) / calls * 1e3


def main():
    torch.set_num_threads(1)
    print(f"{'layer':<18} {'rows':>5} {'[out,in] ms':>12} {'[in,out]ᵀ ms':>13} {'ratio':>6}")
    with torch.inference_mode():
        for name, (outputs, inputs) in SHAPES.items():
            weight = torch.randn(outputs, inputs)
            relaid = weight.t().contiguous().t()
            bias = torch.randn(outputs)
            for rows in (1, 8, 20, 64, 320, 2048):
                x = torch.randn(rows, inputs)
                default = per_call_ms(lambda: F.linear(x, weight, bias))
                favoured = per_call_ms(lambda: F.linear(x, relaid, bias))
                print(f"{name:<18} {rows:>5} {default:>12.3f} {favoured:>13.3f} {favoured / default:>6.2f}")


if __name__ == "__main__":
    main()
