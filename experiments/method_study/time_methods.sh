#!/usr/bin/env bash
# Issue 23's compute plan: one short run of every method of docs/method-study.md on the aligned
# SmolLM2, to time a step of each (refine.json: seconds, steps). Unit sets come from analyses
# whose ablation tables are cut to one prompt (only the masks are needed here).
# Usage: ALIGNED=DIR OUT=DIR experiments/method_study/time_methods.sh
set -euo pipefail
export HF_HUB_OFFLINE=1
ALIGNED=${ALIGNED:-runs/smol/checkpoints/aligned}
OUT=${OUT:-runs/method_study/timing}
SM="+experiment=smollm2 align.enabled=false model.gguf.file=null model.gguf.package=null model.path=$ALIGNED"
CHEAP="analyze.units.ablation_prompts=1 analyze.units.ablation_draws=1"
for m in ssah wanda_diff; do
  [ -f $OUT/units_$m/units.safetensors ] || zorefine $SM 'stages=[analyze]' analyze.method=$m $CHEAP hydra.run.dir=$OUT/units_$m
done
# 5 steps of each; the preset's analyzer layers (11, 13) stand in for an analysis.
run() { name=$1; shift; [ -f $OUT/$name/refine.json ] || zorefine $SM 'stages=[refine]' "$@" hydra.run.dir=$OUT/$name; }
run zo refine.method=zo 'refine.layers=[11,13]' refine.budget=10
run zo_units refine.method=zo refine.units_file=$OUT/units_ssah/units.safetensors refine.units_set=scu refine.budget=10
run zo_full refine.method=zo_full refine.budget=10
run sft refine.method=sft refine.budget=15 refine.fo_lr=1e-5
run sam refine.method=sam refine.sam_rho_mode=relative refine.budget=30 refine.fo_lr=1e-5
run rwp refine.method=rwp refine.budget=15 refine.fo_lr=1e-5
run fo_threat refine.method=fo_threat refine.objective_threat=w4a8:g32 refine.units_file=$OUT/units_wanda_diff/units.safetensors refine.units_set=safety refine.budget=15 refine.fo_lr=1e-5
python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = {}
for d in sorted(out.iterdir()):
    f = d / "refine.json"
    if f.is_file():
        r = json.loads(f.read_text())
        r = r.get("refine", r)
        rows[d.name] = {"steps": r["steps"], "seconds": r["seconds"], "forward_passes": r["forward_passes"]}
print(json.dumps(rows, indent=1))
(out / "timing.json").write_text(json.dumps(rows, indent=1))
PY
