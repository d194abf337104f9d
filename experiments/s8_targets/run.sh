#!/bin/bash
# Study 8: what the objective scores (refine.targets), five refinement seeds per setting,
# 400 forward passes each, val split. Two lanes of one thread each run side by side.
STUDY=s8
source "$(dirname "$0")/../val_study.sh"   # RUN, OUT, PY, sweep, analyze, compare_sweeps
( sweep reference; sweep self_benign refine.targets=self_benign ) &
( sweep self refine.targets=self; sweep self_lr0.1 refine.targets=self refine.lr=0.1 ) &
wait
compare_sweeps reference self_benign self self_lr0.1
