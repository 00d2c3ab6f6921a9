#!/usr/bin/env bash
# Before and after, side by side: every runtime benchmark (embeddings with wrk, text
# generation, translation, speech recognition, text to image) run on two infergate-runtime
# binaries in one sitting, one right after the other, so that both meet the same machine and
# load. The Python references run twice too: how far their own figures move between the two
# runs is the noise a ratio has to beat. Not a CI test: run it by hand (about 15 minutes on 2
# cores).
#
#   runtime/bench/compare.sh BEFORE_BINARY [AFTER_BINARY]
#
# AFTER_BINARY defaults to this checkout's release build. To get a BEFORE_BINARY of another
# revision: git worktree add /tmp/before REV && (cd /tmp/before && cargo build --release -p runtime).
set -euo pipefail

if [ $# -lt 1 ] || [ $# -gt 2 ]; then
  echo "usage: $0 BEFORE_BINARY [AFTER_BINARY]" >&2
  exit 2
fi
before="$(realpath "$1")"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
# shellcheck source=scripts/env.sh
. "$repo/scripts/env.sh"
if [ $# -eq 2 ]; then
  after="$(realpath "$2")"
else
  cargo build --release --locked -q -p runtime --bin infergate-runtime
  after="$INFERGATE_TARGET/release/infergate-runtime"
fi
bench="$repo/runtime/bench"
fixtures="$repo/runtime/fixtures"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT

for name in before after; do
  binary=$before
  [ "$name" = after ] && binary=$after
  echo "== $name: $binary" >&2
  bash "$bench/run.sh" --binary "$binary" --duration 10s > "$out/embed.$name"
  python "$bench/generate.py" "$binary" "$fixtures/llama" 1 > "$out/generate.$name"
  python "$bench/translate.py" "$binary" "$fixtures/marian" 1 > "$out/translate.$name"
  python "$bench/speech.py" "$binary" "$fixtures/whisper" 1 > "$out/speech.$name"
  python "$bench/image.py" "$binary" "$fixtures/stable-diffusion" 1 > "$out/image.$name"
done

python - "$out" <<'PY'
import pathlib, re, sys

out = pathlib.Path(sys.argv[1])


def rows(bench, name):
    """{(server, size): [numbers]} from a benchmark's table rows."""
    table = {}
    for line in (out / f"{bench}.{name}").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[0] in ("native", "python", "infergate", "transformers",
                                              "diffusers") and re.fullmatch(r"c?\d+", fields[1]):
            table[(fields[0], fields[1])] = [float(re.sub(r"[^\d.]", "", f)) for f in fields[2:]]
        elif len(fields) >= 3 and fields[0] in ("infergate", "diffusers"):
            table[(fields[0], "-")] = [float(f) for f in fields[1:]]
    return table


# (benchmark, column, what it measures, whether more is better)
measures = [
    ("embed", 0, "embeddings req/s", True),
    ("embed", 1, "embeddings p50 ms", False),
    ("generate", 0, "generation tokens/s", True),
    ("generate", 1, "generation TTFT p50 ms", False),
    ("translate", 0, "translation sentences/s", True),
    ("speech", 0, "speech s/request", False),
    ("image", 0, "text to image s/step", False),
]
print(f"{'measure':<26} {'server':<13} {'size':>5} {'before':>9} {'after':>9} {'after/before':>13}")
for bench, column, label, more_is_better in measures:
    first, second = rows(bench, "before"), rows(bench, "after")
    for key in sorted(first, key=lambda k: (k[1], k[0])):
        if key not in second or column >= len(first[key]):
            continue
        a, b = first[key][column], second[key][column]
        ratio = b / a if a else float("nan")
        # After/before as a speed: above 1 is faster whichever way the measure runs.
        speed = ratio if more_is_better else 1 / ratio
        print(f"{label:<26} {key[0]:<13} {key[1]:>5} {a:>9.3f} {b:>9.3f} {speed:>12.2f}x")
print("infergate rows compare the two binaries; the reference rows (python, transformers,")
print("diffusers) ran the same code twice, so their ratio is the run-to-run noise.")
PY
