#!/bin/bash
# Study 9: lr schedule and what is selected (modules under a parameter budget instead of the
# top-2 layers), at the shipped defaults otherwise (refine.targets=self_benign), five refinement
# seeds each, 400 forward passes, val split. Runs as one lane of one thread.
RUN=${RUN:-/tmp/default/run}
OUT=${OUT:-/tmp/study/s9}
PY=${PY:-python}
mkdir -p "$OUT"; cd "$OUT"
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
# Module granularity (attention / MLP / norms of each layer), ranked as the default analysis
# ranks layers, the most fragile modules up to a quarter of the decoder weights.
$PY -m zorefine stages=[analyze] align.enabled=false model.path=$RUN/checkpoints/aligned \
  analyze.granularity=module analyze.policy=budget analyze.budget=0.25 hydra.run.dir=$OUT/analyze_module > $OUT/analyze.log 2>&1
common="+experiment=study_val model.path=$RUN/checkpoints/aligned evaluate.cache_dir=$OUT/eval-cache refine.seed=0,1,2,3,4"
sweep() { name=$1; shift; $PY -m zorefine -m $common hydra.sweep.dir=$OUT/$name "$@" > $OUT/$name.log 2>&1; echo "$name done rc=$?" >> $OUT/progress; }
sweep cosine refine.selection_file=$RUN/selection.json refine.lr_schedule=cosine
sweep modules refine.selection_file=$OUT/analyze_module/selection.json
$PY -m zorefine.compare $OUT/cosine $OUT/modules --out $OUT/all > $OUT/compare.log 2>&1
echo "all done" >> $OUT/progress
