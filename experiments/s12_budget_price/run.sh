#!/bin/bash
# Study 12: does the budget curve of study 10 go on (1000 steps = 2000 forward passes), and can
# its over-refusal price be held at 600 steps by a heavier benign term (refine.benign_weight=3,
# which with refine.targets=self_benign weights the model's own benign answers) or a decaying lr
# (cosine)? Shipped defaults otherwise, five refinement seeds each, val split, two lanes.
# AFTER_A / AFTER_B: optional lines to wait for in AFTER_FILE before each lane starts.
STUDY=s12
source "$(dirname "$0")/../val_study.sh"   # RUN, OUT, PY, sweep, analyze, compare_sweeps
( wait_for "$AFTER_A"; sweep steps1000 refine.steps=1000 ) &
( wait_for "$AFTER_B"; sweep steps600_bw3 refine.steps=600 refine.benign_weight=3
  sweep steps600_cosine refine.steps=600 refine.lr_schedule=cosine ) &
wait
compare_sweeps steps1000 steps600_bw3 steps600_cosine
