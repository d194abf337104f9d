#!/bin/bash
# Study 8: what the objective scores (refine.targets), five refinement seeds per setting,
# 400 forward passes each, val split. Two lanes of one thread each run side by side.
# RUN: a default run's directory (checkpoints/aligned, selection.json); OUT: where sweeps go.
RUN=${RUN:-/tmp/default/run}
OUT=${OUT:-/tmp/study/s8}
mkdir -p "$OUT"
# PY: a Python whose zorefine is a frozen (non-editable) install of the commit under study, so
# edits to the checkout cannot reach sweeps that are still composing jobs.
PY=${PY:-python}
cd "$OUT"
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
common="+experiment=study_val model.path=$RUN/checkpoints/aligned refine.selection_file=$RUN/selection.json evaluate.cache_dir=$OUT/eval-cache refine.seed=0,1,2,3,4"
sweep() { name=$1; shift; $PY -m zorefine -m $common hydra.sweep.dir=$OUT/$name "$@" > $OUT/$name.log 2>&1; echo "$name done rc=$?" >> $OUT/progress; }
( sweep reference; sweep self_benign refine.targets=self_benign ) &
( sweep self refine.targets=self; sweep self_lr0.1 refine.targets=self refine.lr=0.1 ) &
wait
$PY -m zorefine.compare $OUT/reference $OUT/self_benign $OUT/self $OUT/self_lr0.1 --out $OUT/all > $OUT/compare.log 2>&1
echo "all done" >> $OUT/progress
