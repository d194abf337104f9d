"""Fine-tune an aligned model on benign data with unit sets frozen (``zorefine-finetune``).

    zorefine-finetune MODEL_DIR OUT_DIR --steps 40 --lr 5e-5 [--data FILE.jsonl]
                      [--freeze RUN/units.safetensors:scu+cu]

What a user does after alignment, with SSAH's defence: the decoder layers train for ``--steps``
AdamW steps on benign (prompt, response) pairs (default: the built-in benign training rows; a
zorefine JSONL otherwise, its benign rows of every split) while the entries of the named unit
sets stay fixed. The result is saved as a safetensors checkpoint with ``zorefine.json`` saying
how it was made. The same loop is the ``finetune:`` threat of the evaluate grid.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from zorefine.data import builtin_path, load_examples
from zorefine.errors import ConfigError, ZorefineError
from zorefine.models.finetune import finetune_steps
from zorefine.models.layers import decoder_parameters
from zorefine.models.loading import load_causal_lm, save_checkpoint
from zorefine.models.param_masks import count_entries, named_sets

__all__ = ["finetune_checkpoint", "main"]


def finetune_checkpoint(model_dir: str, out_dir: str, steps: int, lr: float, data: str | None, freeze: str | None,
                        batch_size: int = 8, max_length: int = 256, seed: int = 0) -> Path:
    """Fine-tune ``model_dir`` and save it to ``out_dir``."""
    rows = [e for e in load_examples(Path(data) if data else builtin_path("safety")) if e.kind == "benign" and (data or e.split == "train")]
    if not rows:
        raise ConfigError(f"{data or 'the built-in data'} has no benign rows to fine-tune on")
    frozen = named_sets(freeze)
    model, tokenizer = load_causal_lm(model_dir, "float32", "cpu")
    params = decoder_parameters(model)
    unknown = [name for name in frozen if name not in params]
    if unknown:
        raise ConfigError(f"the frozen sets name parameters this model's decoder lacks: {unknown[:3]}")
    losses = finetune_steps(model, tokenizer, [(e.prompt, e.response) for e in rows], params, steps, lr, batch_size, max_length, frozen, seed)
    info = {"stage": "finetune", "base": str(model_dir), "steps": steps, "lr": lr, "data": data or "built-in benign train rows",
            "frozen": freeze, "frozen_entries": count_entries(frozen), "first_loss": losses[0], "last_loss": losses[-1]}
    return save_checkpoint(model, tokenizer, out_dir, info)


def main(argv: Sequence[str] | None = None) -> None:
    """Command line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="zorefine-finetune", description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("out_dir")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--lr", type=float, required=True)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default=None, help="a zorefine JSONL (its benign rows); default: the built-in benign training rows")
    parser.add_argument("--freeze", default=None, help="FILE:SET[+SET...], e.g. run/units.safetensors:scu+cu")
    args = parser.parse_args(argv)
    try:
        out = finetune_checkpoint(args.model_dir, args.out_dir, args.steps, args.lr, args.data, args.freeze,
                                  args.batch_size, args.max_length, args.seed)
    except (ZorefineError, FileNotFoundError, ValueError) as error:
        print(f"zorefine-finetune: error: {error}", file=sys.stderr)
        sys.exit(2)
    print(f"fine-tuned checkpoint written to {out}")


if __name__ == "__main__":
    main()
