#!/usr/bin/env bash
# `make demo`: the main job end to end on the bundled example audio, in a few minutes on a laptop
# CPU, with the short forms a new user types (README's first screen), in the working folder demo/:
# prepare a dataset, train the ablated model briefly, evaluate it, continue a song it never heard,
# with the model that ships with ssmgen and with the one just trained. Re-running it adds a run.
set -euo pipefail
cd "$(dirname "$0")/.."
SSMGEN="$(pwd)/.venv/bin/ssmgen"
mkdir -p demo
cd demo

echo "== 0. before any training: continue a song with the model that ships with ssmgen"
"$SSMGEN" continue ../examples/prompt.flac --model ablated-s4d-pieces --seconds 4 --temp 0.9 \
  --out prompt-bundled.wav --force

echo "== 1. ssmgen prep ../examples/audio             (-> demo/data/audio)"
"$SSMGEN" prep ../examples/audio

echo "== 2. ssmgen train --preset ablated --max-minutes 1   (-> demo/runs/ablated-s4d-N)"
"$SSMGEN" train --preset ablated --max-minutes 1

echo "== 3. ssmgen eval                               (the newest run, its test split)"
"$SSMGEN" eval

echo "== 4. ssmgen continue ../examples/prompt.flac --seconds 4 --temp 0.8"
"$SSMGEN" continue ../examples/prompt.flac --seconds 4 --temp 0.8 --force

echo
echo "Done. Listen to demo/*.wav; the training page is the newest demo/runs/*/index.html"
