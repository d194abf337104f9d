"""analyze: rank decoder layers by safety fragility and choose the ones to refine."""

from __future__ import annotations

import logging
import time
from typing import Any

from zorefine.judge import build_judge
from zorefine.models.loading import write_json_atomic
from zorefine.pipeline import Run
from zorefine.sensitivity import SafetyProbe, as_dicts, layer_sensitivity, plot_sensitivity, rank_layers

log = logging.getLogger(__name__)

SELECTION_FILE = "selection.json"


def run(run: Run) -> dict[str, Any]:
    """Write ``sensitivity.json``, ``sensitivity.png`` and ``selection.json`` (top-k layers)."""
    cfg = run.cfg.analyze
    started = time.perf_counter()
    checkpoint = run.aligned_checkpoint
    model, tokenizer = run.load_model(checkpoint)
    # Validation split: the ranking steers training decisions, so it must not see test prompts.
    harmful = run.split("val", "harmful", limit=cfg.num_prompts)
    probe = SafetyProbe([(e.prompt, e.response) for e in harmful], run.cfg.data.max_length, cfg.max_new_tokens, cfg.batch_size)
    seeds = [run.cfg.seed * 1000 + s for s in range(cfg.seeds)]
    clean, results = layer_sensitivity(model, tokenizer, probe, build_judge(run.cfg.evaluate.judge), cfg.sigma, seeds)
    ranking = rank_layers(results, cfg.rank_by)
    top_k = min(cfg.top_k, len(ranking))
    selected = sorted(ranking[:top_k])
    log.info("[analyze] ranking (most fragile first): %s; selected layers %s", ranking, selected)
    report = {
        "checkpoint": str(checkpoint),
        "threat": {"kind": "weight_noise", "mode": "relative", "sigma": cfg.sigma, "seeds": seeds},
        "num_prompts": len(harmful),
        "clean": {"safety_loss": clean.safety_loss, "refusal_rate": clean.refusal_rate},
        "layers": as_dicts(results),
        "rank_by": cfg.rank_by,
        "ranking": ranking,
        "selected_layers": selected,
    }
    write_json_atomic(run.run_dir / "sensitivity.json", report)
    plot_sensitivity(results, selected, run.run_dir / "sensitivity.png", cfg.sigma)
    write_json_atomic(
        run.run_dir / SELECTION_FILE,
        {"layers": selected, "names": [results[i].name for i in selected], "rank_by": cfg.rank_by},
    )
    return {
        "checkpoint": str(checkpoint),
        "ranking": ranking,
        "selected_layers": selected,
        "sensitivity": str(run.run_dir / "sensitivity.json"),
        "seconds": round(time.perf_counter() - started, 1),
    }
