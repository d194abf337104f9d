#!/bin/bash
# Study 12: does the budget curve of study 10 go on (1000 steps = 2000 forward passes), and can
# its over-refusal price be held at 600 steps by a heavier benign term (refine.benign_weight=3,
# which with refine.targets=self_benign weights the model's own benign answers) or a decaying lr
# (cosine)? Shipped defaults otherwise, five refinement seeds each, val split, two lanes.
# RUN / OUT / PY as in study 10; AFTER_FILE, AFTER_A, AFTER_B: optional lines to wait for before
# each lane starts (to queue this study behind another on the same cores).
RUN=${RUN:-/tmp/default/run}
OUT=${OUT:-/tmp/study/s12}
PY=${PY:-python}
mkdir -p "$OUT"; cd "$OUT"
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
wait_for() { [ -z "$1" ] && return; until grep -q "$1" "$AFTER_FILE" 2>/dev/null; do sleep 20; done; }
common="+experiment=study_val model.path=$RUN/checkpoints/aligned refine.selection_file=$RUN/selection.json evaluate.cache_dir=$OUT/eval-cache refine.seed=0,1,2,3,4"
sweep() { name=$1; shift; $PY -m zorefine -m $common hydra.sweep.dir=$OUT/$name "$@" > $OUT/$name.log 2>&1; echo "$name done rc=$?" >> $OUT/progress; }
( wait_for "$AFTER_A"; sweep steps1000 refine.steps=1000 ) &
( wait_for "$AFTER_B"; sweep steps600_bw3 refine.steps=600 refine.benign_weight=3
  sweep steps600_cosine refine.steps=600 refine.lr_schedule=cosine ) &
wait
$PY -m zorefine.compare $OUT/steps1000 $OUT/steps600_bw3 $OUT/steps600_cosine --out $OUT/all > $OUT/compare.log 2>&1
echo "all done" >> $OUT/progress
