#!/usr/bin/env bash
# Resume the SmolLM2 method study on this machine, in the background (docs/method-study.md,
# "Running it"): the worktree of the study's code commit, the aligned model if missing, the
# rebuild check, then PHASE (default: test). Every step skips what is already done, so a new
# session runs this once and goes on with other work.
#
#   experiments/method_study/resume.sh [PHASE] [RUNS]     RUNS default: ../runs beside this checkout
#
# Logs: RUNS/align.log, RUNS/rebuild.log, RUNS/PHASE.log; RUNS/study.done when the phase ends.
set -euo pipefail
MAIN=$(cd "$(dirname "$0")/../.." && pwd)
PHASE=${1:-test}
RUNS=$(mkdir -p "${2:-$MAIN/../runs}" && cd "${2:-$MAIN/../runs}" && pwd)
KEPT=$MAIN/experiments/method_study/runs/smollm2
COMMIT=$(python -c "import json, sys; print(json.load(open(sys.argv[1]))['code']['commit'])" "$KEPT/protocol.json")
STUDY=$MAIN/../study
if [ ! -d "$STUDY" ]; then
  git -C "$MAIN" worktree add --detach "$STUDY" "$COMMIT"
fi
# The protocol pins zorefine/ and conf/; the study script itself comes from this checkout.
cp "$MAIN/experiments/method_study/study.py" "$STUDY/experiments/method_study/study.py"
ALIGNED=$RUNS/smol/checkpoints/aligned
ARGS=(--kept "$KEPT" --aligned "$ALIGNED" --out "$RUNS/method_study/smollm2")
if [ "${RESUME_FOREGROUND:-}" != 1 ]; then
  # Its own process group: `kill -- -PID` stops the study and every job it started.
  RESUME_FOREGROUND=1 setsid "$0" "$PHASE" "$RUNS" > "$RUNS/resume.log" 2>&1 < /dev/null &
  echo "method study: $PHASE running in the background (process group $!); logs in $RUNS"
  exit 0
fi
rm -f "$RUNS/study.done"
cd "$MAIN"
export HF_HUB_OFFLINE=1 PYTHONPATH=$STUDY
if [ ! -f "$ALIGNED/model.safetensors" ]; then
  zorefine --config-path="$STUDY/conf" +experiment=smollm2 'stages=[align]' hydra.run.dir="$RUNS/smol" > "$RUNS/align.log" 2>&1
fi
python "$STUDY/experiments/method_study/study.py" rebuild "${ARGS[@]}" > "$RUNS/rebuild.log" 2>&1
python "$STUDY/experiments/method_study/study.py" "$PHASE" "${ARGS[@]}" > "$RUNS/$PHASE.log" 2>&1
touch "$RUNS/study.done"
