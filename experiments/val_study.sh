# Sourced by the val studies' run.sh (studies 8-13): one definition of where a study reads and
# writes, the environment its jobs run in and how a sweep, an analysis and the closing
# comparison are launched, so the studies differ only in what they sweep.
# RUN: a default run's directory (checkpoints/aligned, selection.json); OUT: where sweeps go
# (default /tmp/study/$STUDY); PY: a Python with a frozen (non-editable) install of the commit
# under study. STUDY_SELECTION: the selection every sweep refines (default the run's own);
# set it empty where each sweep names its own refine.selection_file.
# AFTER_FILE with wait_for LINE: hold a lane until LINE appears there (to queue a study behind
# another on the same cores).
RUN=${RUN:-/tmp/default/run}
OUT=${OUT:-/tmp/study/$STUDY}
PY=${PY:-python}
mkdir -p "$OUT"; cd "$OUT"
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
common="+experiment=study_val model.path=$RUN/checkpoints/aligned ${STUDY_SELECTION-refine.selection_file=$RUN/selection.json} evaluate.cache_dir=$OUT/eval-cache refine.seed=0,1,2,3,4"
wait_for() { [ -z "$1" ] && return; until grep -q "$1" "$AFTER_FILE" 2>/dev/null; do sleep 20; done; }
sweep() { name=$1; shift; $PY -m zorefine -m $common hydra.sweep.dir=$OUT/$name "$@" > $OUT/$name.log 2>&1; echo "$name done rc=$?" >> $OUT/progress; }
analyze() { name=$1; shift; $PY -m zorefine stages=[analyze] align.enabled=false model.path=$RUN/checkpoints/aligned \
  hydra.run.dir=$OUT/analyze_$name "$@" > $OUT/analyze_$name.log 2>&1; }
compare_sweeps() { $PY -m zorefine.evaluate.compare "${@/#/$OUT/}" --out $OUT/all > $OUT/compare.log 2>&1; echo "all done" >> $OUT/progress; }
