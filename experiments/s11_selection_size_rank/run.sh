#!/bin/bash
# Study 11: how many layers are selected (analyze.top_k 1 / 4 against the default 2), how they
# are ranked (analyze.rank_by=refusal_drop against the default safety_loss_rise), and a doubled
# lr at the shipped targets. Shipped defaults otherwise (refine.targets=self_benign, 200 steps),
# five refinement seeds each, val split, two lanes of one thread. Each selection comes from a
# real analyze run on the same aligned model.
# AFTER_A / AFTER_B: optional lines to wait for in AFTER_FILE before each lane starts.
STUDY=s11 STUDY_SELECTION=
source "$(dirname "$0")/../val_study.sh"   # RUN, OUT, PY, sweep, analyze, compare_sweeps
( wait_for "$AFTER_A"
  analyze top1 analyze.top_k=1; sweep top1 refine.selection_file=$OUT/analyze_top1/selection.json
  analyze refusal_drop analyze.rank_by=refusal_drop; sweep refusal_drop refine.selection_file=$OUT/analyze_refusal_drop/selection.json ) &
( wait_for "$AFTER_B"
  analyze top4 analyze.top_k=4; sweep top4 refine.selection_file=$OUT/analyze_top4/selection.json
  sweep lr0.1 refine.selection_file=$RUN/selection.json refine.lr=0.1 ) &
wait
compare_sweeps top1 top4 refusal_drop lr0.1
