#!/usr/bin/env bash
# The GPU check (issue 18): what a first, short GPU slot must tell us, in ONE run of at most about
# 8 minutes on a machine with no network, its own python3 and CUDA PyTorch:
#   1. CUDA tests (`pytest -m cuda`), 2. speed (generation per engine, training samples/s, the 8 s
#   prompt read), 3. quality (a 4-minute ablated S4D run on the music pieces, scored on the
#   held-out piece).
# Every step runs under `timeout` inside one time budget, and a failure never stops the next
# step; the table printed LAST says ok/FAIL per step with its figures. Logs and results.md/json
# go to the results folder (few files: the device tool returns at most 8).
#
#   bash bench/gpu_check.sh                  # on the GPU machine (see docs/benchmarks.md)
#   bash bench/gpu_check.sh --cpu            # dry run here: tiny sizes, CPU, cuda-graph skipped
#
# Options:
#   --out DIR       results (default: $OUT if set, else gpu-results/)
#   --work DIR      datasets, run folder, wheels' site folder (default: a temporary folder,
#                   removed at the end)
#   --pieces DIR    audio to train on (default: gpu-data/pieces, shared/data/pieces or
#                   ../shared/data/pieces, the first that exists; --cpu: examples/audio)
#   --prompt FILE   held-out piece (default: examples/prompt.flac, the same file as
#                   ../shared/data/example_prompt.flac)
#   --python PY     interpreter (default: python3)
#   --minutes M     length of the quality run (default 4; --cpu 0.05)
#   --batch N --length L   override the training recipe (default: what `ssmgen train` picks)
#   --budget S      seconds for the whole check (default 480; --cpu 240)
set -uo pipefail  # no -e: a failing step is recorded and the next one runs

# paths given on the command line are the caller's; the script runs from the repository root
abspath() { case $1 in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }
MODE=gpu OUTDIR=${OUT:-} WORK="" PIECES="" PROMPT="" PY=python3 MINUTES="" BATCH="" LENGTH=""
BUDGET=""
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) MODE=cpu ;;
    --out) OUTDIR=$(abspath "$2"); shift ;;
    --work) WORK=$(abspath "$2"); shift ;;
    --pieces) PIECES=$(abspath "$2"); shift ;;
    --prompt) PROMPT=$(abspath "$2"); shift ;;
    --python) case $2 in */*) PY=$(abspath "$2") ;; *) PY=$2 ;; esac; shift ;;
    --minutes) MINUTES=$2; shift ;;
    --batch) BATCH=$2; shift ;;
    --length) LENGTH=$2; shift ;;
    --budget) BUDGET=$2; shift ;;
    -h|--help) sed -n '2,/^set /p' "$0" | sed '$d'; exit 0 ;;
    *) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
cd "$(dirname "$0")/.."
REPO=$(pwd)

# --- sizes per mode: the same steps, the dry run at tiny sizes on the CPU ------------------------
if [ "$MODE" = gpu ]; then
  DEVICE=cuda WORKERS=4 QPRESET=ablated MINUTES=${MINUTES:-4} BUDGET=${BUDGET:-480}
  # ~1 s of audio at most per run, each run cut to ~0.4 s of wall time: 24 runs in about a
  # minute; cuda-graph first, so that a cut-off run has measured what matters most
  GEN_ARGS=(--engines cuda-graph torch --presets ablated sashimi --backends s4d s4 mamba
            --batch 1 32 --seconds 1 --torch-seconds 1 --run-seconds 0.4 --repeats 2
            --prompt-seconds 8)
  TRAINB_ARGS=(--presets ablated sashimi --backends s4d s4 mamba --repeats 5 --max-seconds 3)
  # Caps per step; each is cut further so that the quality run keeps its minutes plus
  # TRAIN_EXTRA (start-up, last validation) and CAP_EVAL. Typical: env 10 s, tests 40 s,
  # generate 60 s, train 25 s, quality 4.5 min: under 8 minutes.
  CAP_TESTS=90 CAP_GEN=90 CAP_TRAINB=60 CAP_PREP=150 CAP_EVAL=45 TRAIN_EXTRA=30
  EVAL_TEST_ARGS=()
else
  DEVICE=cpu WORKERS=0 QPRESET=tiny MINUTES=${MINUTES:-0.05} BUDGET=${BUDGET:-240}
  # One thread for torch and numba (as the test suite runs torch): on a busy 2-core box more
  # make every tiny op of the tiny model wait on a pool. Measured at load 4: training 4k against
  # 256k samples/s (torch's pool); after Mamba's prompt read (numba's parallel scan) the torch
  # engine's Mamba steps ran at 9-95 samples/s against 3.9-4.3k with NUMBA_NUM_THREADS=1.
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} NUMBA_NUM_THREADS=${NUMBA_NUM_THREADS:-1}
  GEN_ARGS=(--engines torch --presets tiny --backends s4d s4 mamba --batch 1 2 --seconds 0.05
            --torch-seconds 0.05 --run-seconds 0.1 --repeats 1 --prompt-seconds 0.5)
  TRAINB_ARGS=(--presets tiny --backends s4d --repeats 2 --max-seconds 1)
  CAP_TESTS=100 CAP_GEN=100 CAP_TRAINB=60 CAP_PREP=60 CAP_EVAL=60 TRAIN_EXTRA=45
  EVAL_TEST_ARGS=(--max-samples 131072)
fi
if [ -z "$PIECES" ]; then
  if [ "$MODE" = cpu ]; then PIECES=examples/audio
  else
    for d in gpu-data/pieces shared/data/pieces ../shared/data/pieces; do
      [ -d "$d" ] && { PIECES=$d; break; }
    done
    PIECES=${PIECES:-gpu-data/pieces}  # absent: the prep step fails and says so
  fi
fi
PROMPT=${PROMPT:-examples/prompt.flac}
OUTDIR=${OUTDIR:-gpu-results}
mkdir -p "$OUTDIR" || exit 2
OUTDIR=$(cd "$OUTDIR" && pwd)
MADE_WORK=0
if [ -z "$WORK" ]; then WORK=$(mktemp -d "${TMPDIR:-/tmp}/ssmgen-gpu-check.XXXXXX"); MADE_WORK=1; fi
mkdir -p "$WORK" && WORK=$(cd "$WORK" && pwd)
rm -f "$WORK"/{status.tsv,wheels.txt,env.json,junit.xml,gen.jsonl,train.jsonl,eval_*.json} \
  "$OUTDIR"/results.{md,json}  # nothing from an earlier run can pass for this one's
for f in env tests speed quality; do : >"$OUTDIR/$f.log"; done
TRAIN_S=$(awk -v m="$MINUTES" 'BEGIN { printf "%d", m * 60 + 0.999 }')
QARGS=() BARGS=()
[ -n "$BATCH" ] && { QARGS+=(--batch-size "$BATCH"); BARGS+=(--batch "$BATCH"); }
[ -n "$LENGTH" ] && { QARGS+=(--sample-len "$LENGTH"); BARGS+=(--length "$LENGTH"); }

# ssmgen from this tree, no install step (no network, no write into the machine's environment);
# the backends' registry falls back to the built-ins when no entry points are installed.
export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
START=$SECONDS
left() { echo $((BUDGET - (SECONDS - START))); }
# limit CAP RESERVE: CAP seconds, or fewer so that RESERVE seconds stay for the steps after it
limit() { local l=$(($(left) - $2)); [ "$l" -gt "$1" ] && l=$1; echo "$l"; }
# record NAME STATUS SECONDS RC: one row of the table (status.tsv), and a progress line
record() {
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$WORK/status.tsv"
  echo "[$((SECONDS - START)) s] $1: $2"
}

# step NAME LOG LIMIT CMD...: CMD under `timeout` (its whole process group is killed at LIMIT),
# output appended to LOG, the outcome recorded for the table.
step() {
  local name=$1 log=$2 lim=$3 t0=$SECONDS rc status; shift 3
  if [ "$lim" -lt 5 ]; then record "$name" "FAIL (no time left in the budget)" 0 -; return 1; fi
  printf '\n=== %s (limit %s s): %s\n' "$name" "$lim" "$*" >>"$log"
  timeout -k 10 "$lim" "$@" >>"$log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status="FAIL (timed out after $lim s)" ;;
    *) status="FAIL (exit $rc; see $(basename "$log"))" ;;
  esac
  record "$name" "$status" $((SECONDS - t0)) "$rc"
  return $rc
}
RESERVE_Q=$((TRAIN_S + TRAIN_EXTRA + CAP_EVAL))  # kept for the quality run and its evaluation

echo "ssmgen GPU check, mode $MODE, budget $BUDGET s; results in $OUTDIR, work folder $WORK"

# --- 1. environment: missing wheels installed from .whl/ (carried along), then the facts ---------
t0=$SECONDS
MISSING=$(timeout 60 "$PY" bench/gpu_check.py missing 2>>"$OUTDIR/env.log")
if [ -n "$MISSING" ]; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    echo "missing: $MISSING; installing .whl/*.whl into $WORK/site" >>"$OUTDIR/env.log"
    if timeout 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target "$WORK/site" .whl/*.whl >>"$OUTDIR/env.log" 2>&1; then
      export PYTHONPATH="$WORK/site:$PYTHONPATH"
      WHEELS=$(cd .whl && ls *.whl | sed 's/-[0-9].*//' | tr '\n' ' ')
      echo "installed for missing $MISSING: $WHEELS" >"$WORK/wheels.txt"
    else
      echo "pip install of .whl/ FAILED for missing $MISSING" >"$WORK/wheels.txt"
    fi
  else
    echo "missing $MISSING and no .whl/ here (run bench/gpu_wheels.sh and carry .whl)" \
      >"$WORK/wheels.txt"
  fi
fi
timeout 30 "$PY" bench/gpu_check.py env --mode "$MODE" --work "$WORK" >>"$OUTDIR/env.log" 2>&1
rc=$?
command -v nvidia-smi >/dev/null && timeout 20 nvidia-smi >>"$OUTDIR/env.log" 2>&1
timeout 30 "$PY" -m ssmgen doctor >>"$OUTDIR/env.log" 2>&1
record env "$([ $rc = 0 ] && echo ok || echo "FAIL (see env.log)")" $((SECONDS - t0)) $rc
grep -h "^mamba-ssm:" "$OUTDIR/env.log" | head -n 1

# --- 2. the dataset is prepared on the CPU while the CUDA tests run (nothing timed then) ---------
step "quality: prep" "$OUTDIR/quality.log" "$(limit $CAP_PREP $RESERVE_Q)" \
  "$PY" -m ssmgen prep "$PIECES" --out "$WORK/data" --split 80/10/10 &
PREP_PID=$!

# --- 3. CUDA tests: every test marked `cuda` (the dry run: all skipped with one reason) ----------
step "cuda tests" "$OUTDIR/tests.log" "$(limit $CAP_TESTS $RESERVE_Q)" \
  "$PY" -m pytest -m cuda -n "$WORKERS" -p no:cacheprovider --continue-on-collection-errors \
  --junitxml="$WORK/junit.xml" tests
wait "$PREP_PID"  # before the timed sections: prep would compete for the CPU

# --- 4. speed ------------------------------------------------------------------------------------
step "speed: generate" "$OUTDIR/speed.log" "$(limit $CAP_GEN $((RESERVE_Q + 20)))" \
  "$PY" bench/generate.py --device "$DEVICE" "${GEN_ARGS[@]}" --jsonl "$WORK/gen.jsonl"
step "speed: train" "$OUTDIR/speed.log" "$(limit $CAP_TRAINB $RESERVE_Q)" \
  "$PY" bench/train.py --device "$DEVICE" "${TRAINB_ARGS[@]}" "${BARGS[@]}" \
  --jsonl "$WORK/train.jsonl"

# --- 5. quality: the ablated S4D model (tiny in the dry run) for MINUTES, scored held-out --------
# No listening samples: on CUDA they would run the eager torch engine (minutes per sample).
if [ -f "$WORK/data/manifest.json" ]; then
  rm -rf "$WORK/run"
  step "quality: train" "$OUTDIR/quality.log" "$(limit $((TRAIN_S + TRAIN_EXTRA)) $CAP_EVAL)" \
    "$PY" -m ssmgen train "$WORK/data" --preset "$QPRESET" --backend s4d --max-minutes "$MINUTES" \
    --device "$DEVICE" --seed 0 --out "$WORK/run" --set train.sample_seconds=0 --quiet \
    "${QARGS[@]}"
else
  record "quality: train" "FAIL (no dataset: the prep step failed)" 0 -
fi
if [ -f "$WORK/run/checkpoints/best.pt" ]; then
  step "quality: eval" "$OUTDIR/quality.log" "$(limit $CAP_EVAL 0)" bash -c '
    py=$1 run=$2 prompt=$3 device=$4 work=$5; shift 5
    "$py" -m ssmgen eval "$run" --audio "$prompt" --device "$device" --json \
      >"$work/eval_heldout.json" &&
    "$py" -m ssmgen eval "$run" --split test --device "$device" --json "$@" \
      >"$work/eval_test.json" &&
    cat "$work/eval_heldout.json" "$work/eval_test.json"' \
    eval "$PY" "$WORK/run" "$PROMPT" "$DEVICE" "$WORK" "${EVAL_TEST_ARGS[@]}"
else
  record "quality: eval" "FAIL (no checkpoint: the train step failed)" 0 -
fi

# --- 6. the table, last ---------------------------------------------------------------------------
echo "total $((SECONDS - START)) s"
echo
"$PY" bench/gpu_check.py report --mode "$MODE" --work "$WORK" --out "$OUTDIR"
rc=$?
if [ $rc -gt 1 ] || [ ! -s "$OUTDIR/results.md" ]; then  # the report itself broke: the raw table
  echo "(report failed, exit $rc) raw step outcomes:"
  cat "$WORK/status.tsv"
  rc=1
fi
[ "$MADE_WORK" = 1 ] && rm -rf "$WORK"
exit $rc
