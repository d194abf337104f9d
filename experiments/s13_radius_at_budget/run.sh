#!/bin/bash
# Study 13: a smaller smoothing radius at the larger budget. At 200 steps ε = 0.25 × RMS paid a
# quarter of the over-refusal of ε = 0.5 for a third of the gain (study 10); with three times the
# steps (600, 1200 forward passes) does a small radius buy a useful gain while holding the price?
# ε 0.25 and 0.35, shipped defaults otherwise, five refinement seeds each, val split, two lanes.
# RUN / OUT / PY as in study 10.
RUN=${RUN:-/tmp/default/run}
OUT=${OUT:-/tmp/study/s13}
PY=${PY:-python}
mkdir -p "$OUT"; cd "$OUT"
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
common="+experiment=study_val model.path=$RUN/checkpoints/aligned refine.selection_file=$RUN/selection.json evaluate.cache_dir=$OUT/eval-cache refine.seed=0,1,2,3,4"
sweep() { name=$1; shift; $PY -m zorefine -m $common hydra.sweep.dir=$OUT/$name "$@" > $OUT/$name.log 2>&1; echo "$name done rc=$?" >> $OUT/progress; }
( sweep steps600_eps0.25 refine.steps=600 refine.eps=0.25 ) &
( sweep steps600_eps0.35 refine.steps=600 refine.eps=0.35 ) &
wait
$PY -m zorefine.compare $OUT/steps600_eps0.25 $OUT/steps600_eps0.35 --out $OUT/all > $OUT/compare.log 2>&1
echo "all done" >> $OUT/progress
