#!/usr/bin/env bash
# Resume a method study on this machine, in the background (docs/method-study.md, "Running it"):
# the worktree of the study's code commit, the aligned model if missing, the rebuild check, then
# each PHASE in turn (default: test). Every step skips what is already done, so a new session
# runs this once and goes on with other work.
#
#   experiments/method_study/resume.sh [PHASES] [RUNS]      PHASES: comma-separated, e.g. tune,select,test,table,plot
#   TARGET=builtin experiments/method_study/resume.sh ...   the built-in testbed (default TARGET: smollm2)
#
# RUNS default: ../runs beside this checkout. Logs: RUNS/align.log, RUNS/rebuild.log,
# RUNS/PHASE.log (RUNS/PHASE.K.log per shard); RUNS/study.done when the phases end (the built-in
# study: the same names under RUNS/builtin_study).
#
# The built-in study runs its tune and test jobs as two one-thread shards (`--shard`), one per
# core; its aligned model was built with one thread, and a rebuild must be too (thread count can
# change the last bits). SmolLM2 runs one two-thread process, as its build did.
set -euo pipefail
MAIN=$(cd "$(dirname "$0")/../.." && pwd)
PHASES=${1:-test}
RUNS=$(mkdir -p "${2:-$MAIN/../runs}" && cd "${2:-$MAIN/../runs}" && pwd)
TARGET=${TARGET:-smollm2}
KEPT=$MAIN/experiments/method_study/runs/$TARGET
# A study that has not started pins this checkout's commit (prepare records it in protocol.json).
if [ -f "$KEPT/protocol.json" ]; then
  COMMIT=$(python -c "import json, sys; print(json.load(open(sys.argv[1]))['code']['commit'])" "$KEPT/protocol.json")
else
  COMMIT=$(git -C "$MAIN" rev-parse HEAD)
fi
if [ "$TARGET" = builtin ]; then
  STUDY=$MAIN/../study_builtin LOGS=$RUNS/builtin_study SHARDS=2
  export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
  ALIGNED=$LOGS/builtin/checkpoints/aligned ALIGN_RUN=$LOGS/builtin ALIGN_ARGS=()
else
  STUDY=$MAIN/../study LOGS=$RUNS SHARDS=1
  ALIGNED=$RUNS/smol/checkpoints/aligned ALIGN_RUN=$RUNS/smol ALIGN_ARGS=(+experiment=smollm2)
fi
mkdir -p "$LOGS"
if [ ! -d "$STUDY" ]; then
  git -C "$MAIN" worktree add --detach "$STUDY" "$COMMIT"
fi
# The protocol pins zorefine/ and conf/; the study script itself comes from this checkout.
cp "$MAIN/experiments/method_study/study.py" "$STUDY/experiments/method_study/study.py"
ARGS=(--target "$TARGET" --kept "$KEPT" --aligned "$ALIGNED" --out "$LOGS/method_study/$TARGET")
if [ "${RESUME_FOREGROUND:-}" != 1 ]; then
  # Its own process group: `kill -- -PID` stops the study and every job it started.
  RESUME_FOREGROUND=1 setsid "$0" "$PHASES" "$RUNS" > "$LOGS/resume.log" 2>&1 < /dev/null &
  echo "method study ($TARGET): $PHASES running in the background (process group $!); logs in $LOGS"
  exit 0
fi
rm -f "$LOGS/study.done"
cd "$MAIN"
export HF_HUB_OFFLINE=1 PYTHONPATH=$STUDY
if [ ! -f "$ALIGNED/model.safetensors" ]; then
  zorefine --config-path="$STUDY/conf" "${ALIGN_ARGS[@]}" 'stages=[align]' hydra.run.dir="$ALIGN_RUN" > "$LOGS/align.log" 2>&1
fi
SCRIPT=$STUDY/experiments/method_study/study.py
# The rebuild check needs tuning's first job (it compares against its unrefined model).
if [ -f "$KEPT/tune/zo/c0/metrics.json" ]; then
  python "$SCRIPT" rebuild "${ARGS[@]}" > "$LOGS/rebuild.log" 2>&1
fi
for PHASE in ${PHASES//,/ }; do
  echo "$(date -u +%FT%T) $PHASE start" >> "$LOGS/phases.log"
  if [ "$SHARDS" -gt 1 ] && { [ "$PHASE" = tune ] || [ "$PHASE" = test ]; }; then
    pids=()
    for ((k = 0; k < SHARDS; k++)); do
      python "$SCRIPT" "$PHASE" "${ARGS[@]}" --shard "$k/$SHARDS" > "$LOGS/$PHASE.$k.log" 2>&1 & pids+=($!)
      sleep 30  # the first shard writes protocol.json before the next reads it
    done
    for pid in "${pids[@]}"; do wait "$pid"; done
  else
    python "$SCRIPT" "$PHASE" "${ARGS[@]}" > "$LOGS/$PHASE.log" 2>&1
  fi
  echo "$(date -u +%FT%T) $PHASE done" >> "$LOGS/phases.log"
done
touch "$LOGS/study.done"
