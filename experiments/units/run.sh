#!/usr/bin/env bash
# Issue 22's tables: every unit method on the built-in model and on the aligned SmolLM2, then the
# agreement between methods. Results (units.json, units.md) are copied to experiments/units/.
# CPU wall time on 2 cores (2026-12-03): built-in ~2-5 min per method once the aligned model is
# cached (the first run pretrains and aligns it, ~5 min); SmolLM2 ~5-15 min per method.
set -euo pipefail
export HF_HUB_OFFLINE=1
OUT=${OUT:-runs/units}
B=$OUT/builtin
COMMON="align.cache_dir=$HOME/.cache/zorefine/aligned model.builtin.cache_dir=$HOME/.cache/zorefine/builtin"
for m in ssah wanda_diff snip_diff safeseek; do
  zorefine 'stages=[align,analyze]' analyze.method=$m $COMMON hydra.run.dir=$B/$m
done
for spec in finetune:50:1e-3 finetune:100:3e-3 finetune:100:1e-2; do  # 1-2 min each
  zorefine 'stages=[align,analyze]' analyze.method=ssah analyze.units.finetune=$spec $COMMON hydra.run.dir=$B/ssah_${spec//:/_}
done
for m in wanda_diff snip_diff; do
  for qp in "0.05 0.2" "0.1 0.5"; do
    set -- $qp
    zorefine 'stages=[align,analyze]' analyze.method=$m analyze.units.q=$1 analyze.units.p=$2 $COMMON hydra.run.dir=$B/${m}_q$1_p$2
  done
done
zorefine 'stages=[align,analyze]' $COMMON hydra.run.dir=$B/perturbation
python -m zorefine.analyze.unit_agreement $B/ssah $B/wanda_diff $B/snip_diff $B/safeseek --layers $B/perturbation --out $B/agreement.md
# SmolLM2: the preset's aligned model (zorefine +experiment=smollm2 'stages=[align]' hydra.run.dir=runs/smol).
ALIGNED=${ALIGNED:-runs/smol/checkpoints/aligned}
S=$OUT/smol
SM="+experiment=smollm2 align.enabled=false model.gguf.file=null model.gguf.package=null model.path=$ALIGNED"
zorefine $SM 'stages=[analyze]' analyze.method=ssah analyze.units.finetune=finetune:40:5e-5 hydra.run.dir=$S/ssah
for m in wanda_diff snip_diff safeseek; do
  zorefine $SM 'stages=[analyze]' analyze.method=$m hydra.run.dir=$S/$m
done
python -m zorefine.analyze.unit_agreement $S/ssah $S/wanda_diff $S/snip_diff $S/safeseek --out $S/agreement.md
