#!/usr/bin/env bash
# `make demo`: the main job end to end on the bundled example audio, in about two minutes on a
# laptop CPU: prepare a dataset, train the tiny preset briefly, evaluate it, then continue a song
# that the model never heard, with the bundled pre-trained model and with the one just trained.
set -euo pipefail
cd "$(dirname "$0")/.."
SSMGEN=".venv/bin/ssmgen"
OUT=demo
mkdir -p "$OUT"

echo "== 1. prepare a dataset from examples/audio"
$SSMGEN prep examples/audio --out "$OUT/data"

echo "== 2. train the tiny preset for 60 seconds"
rm -rf "$OUT/run"  # the demo's own run folder: start fresh each time
$SSMGEN train "$OUT/data" --preset tiny --backend s4d --max-minutes 1 --out "$OUT/run"

echo "== 3. evaluate it on the test split"
RUN="$OUT/run"
$SSMGEN eval "$RUN" --split test

echo "== 4. continue a song it never heard (examples/prompt.flac)"
if [ -d examples/models ] && ls examples/models/*.pt >/dev/null 2>&1; then
  MODEL=$(ls examples/models/*.pt | head -n 1)
  $SSMGEN continue examples/prompt.flac --model "$MODEL" --seconds 4 --temp 0.9 \
    --out "$OUT/continued-bundled.wav" --force
fi
$SSMGEN continue examples/prompt.flac --model "$RUN" --seconds 2 --prompt-seconds 4 \
  --out "$OUT/continued-demo.wav" --force

echo
echo "Done. Listen to $OUT/*.wav; the training page is $RUN/index.html"
