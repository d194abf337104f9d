"""Read the real model's answers by hand and check the keyword judge against them.

Two steps, so that the labels are written before any verdict is seen:

    python experiments/real_model/judge_check.py generate OUT.jsonl MODEL_DIR NAME [MODEL_DIR NAME ...]
    #   ... label every row by hand into LABELS.jsonl: {"id": ..., "label": "refusal"|"compliance"|"degenerate"}
    python experiments/real_model/judge_check.py score OUT.jsonl LABELS.jsonl [FLUENCY_MAX_NLL]

``generate`` answers the first 15 harmful prompts of the val split and the first 10 XSTest safe
prompts of the val split, clean and under W4A4 (g32) and relative weight noise σ=0.05 (seed 0 of
the ``val`` noise stream), greedy, 48 new tokens. ``score`` prints the agreement, the confusion
counts and every disagreement, on the binary label (refusal or not: degenerate answers are no
refusal, as in the XSTest mapping; partial refusals are refusals) and on the three-way one.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

from zorefine.data import builtin_path, load_examples
from zorefine.judge.keyword import KeywordJudge
from zorefine.judge.verdict import Verdict
from zorefine.models.generation import generate_responses
from zorefine.models.loading import load_causal_lm
from zorefine.models.objectives import per_example_nll
from zorefine.threats import WeightNoise, threatened
from zorefine.threats.streams import stream_seed

CONDITIONS = {"clean": None, "w4a4:g32": "w4a4:g32", "wnoise σ=0.05": WeightNoise(0.05, "relative", stream_seed("val", 0))}


def _prompts() -> list[tuple[str, str]]:
    harmful = [e.prompt for e in load_examples(builtin_path("safety")) if e.split == "val" and e.kind == "harmful"][:15]
    safe = [e.prompt for e in load_examples(builtin_path("xstest_safe")) if e.split == "val"][:10]
    return [("harmful", p) for p in harmful] + [("xstest_safe", p) for p in safe]


def generate(out: Path, models: list[tuple[str, str]]) -> None:
    prompts = _prompts()
    rows = []
    for directory, name in models:
        model, tokenizer = load_causal_lm(directory, "float32", "cpu")
        for label, threat in CONDITIONS.items():
            with threatened(model, threat) if threat is not None else contextlib.nullcontext():
                answers = generate_responses(model, tokenizer, [p for _, p in prompts], max_new_tokens=48, batch_size=25)
            # Fluency under the clean model (the threat removed), as evaluate.fluency_max_nll reads it.
            nlls = per_example_nll(model, tokenizer, [(p, a) for (_, p), a in zip(prompts, answers)], 256, 25)
            for (kind, prompt), answer, nll in zip(prompts, answers, nlls):
                rows.append({"id": len(rows), "model": name, "condition": label, "kind": kind, "prompt": prompt,
                             "completion": answer, "clean_nll": round(nll, 3)})
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} completions to {out}")


def score(completions: Path, labels: Path, fluency_max_nll: float | None = None) -> None:
    rows = {r["id"]: r for r in map(json.loads, completions.read_text().splitlines())}
    human = {r["id"]: r["label"] for r in map(json.loads, labels.read_text().splitlines()) if r.get("label")}
    judge = KeywordJudge()
    confusion: dict[tuple[str, str], int] = {}
    misses = []
    binary_agree = 0
    for row_id, label in sorted(human.items()):
        verdict = judge.judge(rows[row_id]["completion"])
        if fluency_max_nll is not None and rows[row_id]["clean_nll"] > fluency_max_nll:
            verdict = Verdict.DEGENERATE
        confusion[(label, verdict.value)] = confusion.get((label, verdict.value), 0) + 1
        binary_agree += (label == "refusal") == (verdict is Verdict.REFUSAL)
        if verdict.value != label:
            misses.append((row_id, label, verdict.value, rows[row_id]["completion"][:160]))
    three_way = sum(n for (h, j), n in confusion.items() if h == j)
    print(json.dumps({"n": len(human), "binary_agreement": round(binary_agree / len(human), 4),
                      "three_way_agreement": round(three_way / len(human), 4),
                      "confusion (human/judge)": {f"{h}/{j}": n for (h, j), n in sorted(confusion.items())}}))
    for miss in misses:
        print(json.dumps(miss, ensure_ascii=False))


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    if command == "generate":
        generate(Path(args[0]), list(zip(args[1::2], args[2::2])))
    elif command == "score":
        score(Path(args[0]), Path(args[1]), float(args[2]) if len(args) > 2 else None)
    else:
        sys.exit(__doc__)
