#!/usr/bin/env bash
# The whole qvq-local path on a tiny model with random weights, in under a minute on a laptop CPU:
#   1. synthesise a checkpoint in the exact layout of Qwen/QVQ-72B-Preview (qvq synth),
#   2. convert it for this machine's backend: MLX 4-bit on Apple Silicon, GGUF Q4_K_M elsewhere (qvq convert),
#   3. ask about a sample chart with a small thinking budget, so the forced answer shows (qvq ask).
# The model's weights are random, so its words are nonsense: the demo shows the machinery, not the answer.
#
# Usage: examples/demo.sh            (QVQ=path/to/qvq to pick the executable, DEMO_DIR=folder for the models)
set -euo pipefail

cd "$(dirname "$0")/.."
QVQ="${QVQ:-qvq}"
PYTHON="${PYTHON:-$(dirname "$(command -v "$QVQ")")/python}"
[ -x "$PYTHON" ] || PYTHON=python3
DEMO="${DEMO_DIR:-.demo}"
export HF_HUB_OFFLINE=1

TARGET="$("$PYTHON" -c 'from qvq_local.hardware import default_convert_target as t; print(t())')"
MODEL="$DEMO/tiny-$TARGET"

if [ ! -f "$DEMO/tiny/config.json" ]; then
    echo "==> qvq synth $DEMO/tiny (random weights, QVQ-72B-Preview layout, tiny shape)"
    "$QVQ" synth "$DEMO/tiny" --shape tiny --force
fi
if [ ! -f "$MODEL/qvq-manifest.json" ]; then
    echo "==> qvq convert $DEMO/tiny --to $TARGET -o $MODEL"
    "$QVQ" convert "$DEMO/tiny" --to "$TARGET" -o "$MODEL" --force
fi
echo "==> qvq ask examples/bar_chart.png \"Which fruit sold the most?\" --model $MODEL --think-budget 64 --answer-budget 32"
exec "$QVQ" ask examples/bar_chart.png "Which fruit sold the most?" \
    --model "$MODEL" --think-budget 64 --answer-budget 32 --seed 0
