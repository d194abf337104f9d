#!/bin/bash
# Study 13: a smaller smoothing radius at the larger budget. At 200 steps ε = 0.25 × RMS paid a
# quarter of the over-refusal of ε = 0.5 for a third of the gain (study 10); with three times the
# steps (600, 1200 forward passes) does a small radius buy a useful gain while holding the price?
# ε 0.25 and 0.35, shipped defaults otherwise, five refinement seeds each, val split, two lanes.
STUDY=s13
source "$(dirname "$0")/../val_study.sh"   # RUN, OUT, PY, sweep, analyze, compare_sweeps
( sweep steps600_eps0.25 refine.steps=600 refine.zo.eps=0.25 ) &
( sweep steps600_eps0.35 refine.steps=600 refine.zo.eps=0.35 ) &
wait
compare_sweeps steps600_eps0.25 steps600_eps0.35
