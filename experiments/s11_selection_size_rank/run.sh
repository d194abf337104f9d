#!/bin/bash
# Study 11: how many layers are selected (analyze.top_k 1 / 4 against the default 2), how they
# are ranked (analyze.rank_by=refusal_drop against the default safety_loss_rise), and a doubled
# lr at the shipped targets. Shipped defaults otherwise (refine.targets=self_benign, 200 steps),
# five refinement seeds each, val split, two lanes of one thread. Each selection comes from a
# real analyze run on the same aligned model.
# RUN: a default run's directory (checkpoints/aligned, selection.json); OUT: where sweeps go;
# PY: a Python with a frozen (non-editable) install of the commit under study.
# AFTER_A / AFTER_B: optional lines to wait for in AFTER_FILE before each lane starts (to queue
# this study behind another on the same cores).
RUN=${RUN:-/tmp/default/run}
OUT=${OUT:-/tmp/study/s11}
PY=${PY:-python}
mkdir -p "$OUT"; cd "$OUT"
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
wait_for() { [ -z "$1" ] && return; until grep -q "$1" "$AFTER_FILE" 2>/dev/null; do sleep 20; done; }
analyze() { name=$1; shift; $PY -m zorefine stages=[analyze] align.enabled=false model.path=$RUN/checkpoints/aligned \
  hydra.run.dir=$OUT/analyze_$name "$@" > $OUT/analyze_$name.log 2>&1; }
common="+experiment=study_val model.path=$RUN/checkpoints/aligned evaluate.cache_dir=$OUT/eval-cache refine.seed=0,1,2,3,4"
sweep() { name=$1; shift; $PY -m zorefine -m $common hydra.sweep.dir=$OUT/$name "$@" > $OUT/$name.log 2>&1; echo "$name done rc=$?" >> $OUT/progress; }
( wait_for "$AFTER_A"
  analyze top1 analyze.top_k=1; sweep top1 refine.selection_file=$OUT/analyze_top1/selection.json
  analyze refusal_drop analyze.rank_by=refusal_drop; sweep refusal_drop refine.selection_file=$OUT/analyze_refusal_drop/selection.json ) &
( wait_for "$AFTER_B"
  analyze top4 analyze.top_k=4; sweep top4 refine.selection_file=$OUT/analyze_top4/selection.json
  sweep lr0.1 refine.selection_file=$RUN/selection.json refine.lr=0.1 ) &
wait
$PY -m zorefine.compare $OUT/top1 $OUT/top4 $OUT/refusal_drop $OUT/lr0.1 --out $OUT/all > $OUT/compare.log 2>&1
echo "all done" >> $OUT/progress
