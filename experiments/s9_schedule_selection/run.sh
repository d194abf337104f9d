#!/bin/bash
# Study 9: lr schedule and what is selected (modules under a parameter budget instead of the
# top-2 layers), at the shipped defaults otherwise (refine.targets=self_benign), five refinement
# seeds each, 400 forward passes, val split. Runs as one lane of one thread.
STUDY=s9 STUDY_SELECTION=
source "$(dirname "$0")/../val_study.sh"   # RUN, OUT, PY, sweep, analyze, compare_sweeps
# Module granularity (attention / MLP / norms of each layer), ranked as the default analysis
# ranks layers, the most fragile modules up to a quarter of the decoder weights.
analyze module analyze.granularity=module analyze.policy=budget analyze.budget=0.25
sweep cosine refine.selection_file=$RUN/selection.json refine.lr_schedule=cosine
sweep modules refine.selection_file=$OUT/analyze_module/selection.json
compare_sweeps cosine modules
