#!/bin/bash
# Study 10: smoothing radius (relative ε 0.25 / 1.0 against the default 0.5), the threat-aware
# objective at the shipped targets (loss under relative weight noise σ = 0.6, lr cut to 0.02),
# and three times the steps (600 steps, 1200 forward passes). Shipped defaults otherwise
# (refine.targets=self_benign), five refinement seeds each, val split, two lanes of one thread.
STUDY=s10
source "$(dirname "$0")/../val_study.sh"   # RUN, OUT, PY, sweep, analyze, compare_sweeps
( sweep defaults; sweep eps1.0 refine.zo.eps=1.0; sweep threat_aware refine.objective_threat=wnoise:0.6 refine.lr=0.02 ) &
( sweep steps600 refine.steps=600; sweep eps0.25 refine.zo.eps=0.25 ) &
wait
compare_sweeps defaults eps0.25 eps1.0 threat_aware steps600
