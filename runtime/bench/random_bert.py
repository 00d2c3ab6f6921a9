"""Writes a BERT encoder of any size with arbitrary weights, for load and admission benchmarks
where the cost of a forward pass matters and its numbers do not (the parity fixtures are tiny on
purpose). Standard library only, so it runs on a bare GPU machine:

    python runtime/bench/random_bert.py OUT_DIR [--layers 12 --hidden 768 --heads 12]

The tokenizer and sentence-transformers files come from runtime/fixtures/bert-mean (its 132-token
vocabulary: send token ids below 132). Weights are a fixed pseudo-random pattern of scale 0.02,
LayerNorm weights 1 and biases 0, in float32 safetensors.
"""
import argparse
import array
import json
import random
import shutil
import struct
from pathlib import Path

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "bert-mean"
VOCAB = 132


def tensors(layers, hidden, intermediate, positions):
    yield "embeddings.word_embeddings.weight", (VOCAB, hidden), "normal"
    yield "embeddings.position_embeddings.weight", (positions, hidden), "normal"
    yield "embeddings.token_type_embeddings.weight", (2, hidden), "normal"
    yield "embeddings.LayerNorm.weight", (hidden,), "one"
    yield "embeddings.LayerNorm.bias", (hidden,), "zero"
    for i in range(layers):
        layer = f"encoder.layer.{i}"
        for name in ("query", "key", "value"):
            yield f"{layer}.attention.self.{name}.weight", (hidden, hidden), "normal"
            yield f"{layer}.attention.self.{name}.bias", (hidden,), "zero"
        yield f"{layer}.attention.output.dense.weight", (hidden, hidden), "normal"
        yield f"{layer}.attention.output.dense.bias", (hidden,), "zero"
        yield f"{layer}.attention.output.LayerNorm.weight", (hidden,), "one"
        yield f"{layer}.attention.output.LayerNorm.bias", (hidden,), "zero"
        yield f"{layer}.intermediate.dense.weight", (intermediate, hidden), "normal"
        yield f"{layer}.intermediate.dense.bias", (intermediate,), "zero"
        yield f"{layer}.output.dense.weight", (hidden, intermediate), "normal"
        yield f"{layer}.output.dense.bias", (hidden,), "zero"
        yield f"{layer}.output.LayerNorm.weight", (hidden,), "one"
        yield f"{layer}.output.LayerNorm.bias", (hidden,), "zero"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--positions", type=int, default=512)
    args = parser.parse_args()
    intermediate = 4 * args.hidden
    args.out.mkdir(parents=True, exist_ok=True)

    # A block of normal values tiled over every weight: generating each value would take
    # minutes in pure Python, and the pass costs the same whatever the values are.
    rng = random.Random(0)
    block = array.array("f", (rng.gauss(0.0, 0.02) for _ in range(1 << 16)))
    specs = list(tensors(args.layers, args.hidden, intermediate, args.positions))
    header, offset = {}, 0
    for name, shape, _ in specs:
        size = 4
        for dim in shape:
            size *= dim
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(args.out / "model.safetensors", "wb") as out:
        out.write(struct.pack("<Q", len(encoded)))
        out.write(encoded)
        for _, shape, kind in specs:
            count = 1
            for dim in shape:
                count *= dim
            if kind == "normal":
                values = block * (count // len(block) + 1)
                del values[count:]
            else:
                values = array.array("f", [1.0 if kind == "one" else 0.0]) * count
            out.write(values.tobytes())

    config = json.loads((FIXTURE / "config.json").read_text())
    config.update({
        "hidden_size": args.hidden,
        "intermediate_size": intermediate,
        "num_attention_heads": args.heads,
        "num_hidden_layers": args.layers,
        "max_position_embeddings": args.positions,
        "vocab_size": VOCAB,
    })
    (args.out / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json", "modules.json"):
        shutil.copy(FIXTURE / name, args.out / name)
    (args.out / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": args.positions, "do_lower_case": False}))
    (args.out / "1_Pooling").mkdir(exist_ok=True)
    pooling = json.loads((FIXTURE / "1_Pooling" / "config.json").read_text())
    pooling["word_embedding_dimension"] = args.hidden
    (args.out / "1_Pooling" / "config.json").write_text(json.dumps(pooling, indent=2))
    print(f"{args.out}: {args.layers} layers, hidden {args.hidden}, {offset / 2**20:.0f} MiB of weights")


if __name__ == "__main__":
    main()
