#!/bin/bash
# The final table (test split, used once): the shipped defaults and every baseline at an equal
# budget of 400 forward-pass equivalents, five refinement seeds each, from one aligned model.
# RUN: a default run's directory (checkpoints/aligned, selection.json); OUT: where sweeps go;
# PY: a Python with a frozen (non-editable) install of the commit whose defaults are measured.
RUN=${RUN:-/tmp/default/run}
OUT=${OUT:-/tmp/final}
PY=${PY:-python}
mkdir -p "$OUT"; cd "$OUT"
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
anoise='"anoise:0.4:seed=0","anoise:0.4:seed=1","anoise:0.4:seed=2","anoise:0.4:seed=3","anoise:0.4:seed=4"'
common=(stages=[refine,evaluate] model.path=$RUN/checkpoints/aligned refine.selection_file=$RUN/selection.json
        evaluate.split=test evaluate.seeds=5 'evaluate.sigmas=[0.6,0.8,1.0]'
        "evaluate.quantization=[rtn:int4,bnb:nf4,$anoise]" evaluate.cache_dir=$OUT/eval-cache)
# sweep NAME [OVERRIDES...]: five refinement seeds unless the overrides name refine.seed.
sweep() { name=$1; shift; seeds=refine.seed=0,1,2,3,4; [[ "$*" == *refine.seed=* ]] && seeds=
  $PY -m zorefine -m "${common[@]}" $seeds hydra.sweep.dir=$OUT/$name "$@" > $OUT/$name.log 2>&1; echo "$name done rc=$?" >> $OUT/progress; }
# Two lanes of one thread each, side by side (each may evaluate the unrefined model once; the cache keeps one).
# Every method scores the shipped objective (refine.targets=self_benign); the last sweep is
# continued SFT on the data's own responses (refine.targets=reference), split over both lanes.
( sweep zo refine.method=zo; sweep zo_full refine.method=zo_full; sweep zo_random refine.method=zo_random
  sweep sft_reference_a refine.method=sft refine.targets=reference refine.seed=0,1,2 ) &
( sweep sft refine.method=sft; sweep sam refine.method=sam; sweep rwp refine.method=rwp
  sweep sft_reference_b refine.method=sft refine.targets=reference refine.seed=3,4 ) &
wait
$PY -m zorefine.evaluate.compare $OUT/zo $OUT/zo_full $OUT/zo_random $OUT/sft $OUT/sam $OUT/rwp $OUT/sft_reference_a $OUT/sft_reference_b \
  --out $OUT/all > $OUT/compare.log 2>&1
echo "all done" >> $OUT/progress
