#!/bin/bash
# Study 7: five refinement seeds per setting, equal budget of 400 forward passes, val split.
cd /tmp
export PYTHONPATH=/tmp/frozen HF_HUB_OFFLINE=1
RUN=/tmp/default/run
common="+experiment=study_val model.path=$RUN/checkpoints/aligned refine.selection_file=$RUN/selection.json evaluate.cache_dir=/tmp/study/s7/eval-cache refine.seed=0,1,2,3,4"
sweep() { name=$1; shift; python -m zorefine -m $common hydra.sweep.dir=/tmp/study/s7/$name "$@" > /tmp/study/s7/$name.log 2>&1; echo "$name done rc=$?" >> /tmp/study/s7/progress; }
sweep sgd
sweep adam refine.zo.optimizer=adam refine.lr=0.005
sweep momentum refine.zo.optimizer=momentum refine.lr=0.005
sweep q4 refine.zo.num_directions=4 refine.steps=50
sweep sft refine.method=sft
sweep zo_full refine.method=zo_full
