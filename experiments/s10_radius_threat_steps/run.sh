#!/bin/bash
# Study 10: smoothing radius (relative ε 0.25 / 1.0 against the default 0.5), the threat-aware
# objective at the shipped targets (loss under relative weight noise σ = 0.6, lr cut to 0.02),
# and three times the steps (600 steps, 1200 forward passes). Shipped defaults otherwise
# (refine.targets=self_benign), five refinement seeds each, val split, two lanes of one thread.
# RUN: a default run's directory (checkpoints/aligned, selection.json); OUT: where sweeps go;
# PY: a Python with a frozen (non-editable) install of the commit under study.
RUN=${RUN:-/tmp/default/run}
OUT=${OUT:-/tmp/study/s10}
PY=${PY:-python}
mkdir -p "$OUT"; cd "$OUT"
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
common="+experiment=study_val model.path=$RUN/checkpoints/aligned refine.selection_file=$RUN/selection.json evaluate.cache_dir=$OUT/eval-cache refine.seed=0,1,2,3,4"
sweep() { name=$1; shift; $PY -m zorefine -m $common hydra.sweep.dir=$OUT/$name "$@" > $OUT/$name.log 2>&1; echo "$name done rc=$?" >> $OUT/progress; }
( sweep defaults; sweep eps1.0 refine.eps=1.0; sweep threat_aware refine.objective_threat=wnoise:0.6 refine.lr=0.02 ) &
( sweep steps600 refine.steps=600; sweep eps0.25 refine.eps=0.25 ) &
wait
$PY -m zorefine.compare $OUT/defaults $OUT/eps0.25 $OUT/eps1.0 $OUT/threat_aware $OUT/steps600 --out $OUT/all > $OUT/compare.log 2>&1
echo "all done" >> $OUT/progress
