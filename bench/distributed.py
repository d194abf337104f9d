"""Benchmark: what data-parallel ZO costs on the wire, and what a second process buys.

Runs the real ``zorefine`` refine stage under ``torch.distributed.run`` with 1 and then 2
processes (gloo on CPU, NCCL on GPUs), same model, same global batch, same steps, and prints
one JSON object:

- ``bytes_sent_per_step``: bytes each process sent per ZO step (the all-reduced loss sums:
  2 float64 numbers per forward pass, 2 forward passes per direction), measured by zorefine's
  own collective wrapper, against ``model_bytes`` (what a gradient all-reduce would move);
- ``throughput_ratio_2_over_1``: steps per second with 2 processes ÷ with 1 process (ideal: 2;
  the two passes of a step halve their batch per process, the weight writes do not);
- ``zero3_step_over_whole_step``: with ``--zero3``, a 2-process step with ZeRO-3-partitioned
  parameters ÷ a 2-process step with whole copies (the cost of gathering weights per pass).

Each process gets ``--threads`` intra-op threads (default 1), so 2 processes use twice the
cores of 1: the ratio measures scaling with hardware, as adding GPUs would.

Usage: ``python bench/distributed.py [--hidden 256] [--layers 8] [--batch 16] [--steps 20] [--zero3]``
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def write_model(out_dir: Path, hidden: int, layers: int) -> int:
    """A random Llama-style model with the built-in tokenizer; returns its size in bytes (fp32)."""
    import torch
    import transformers

    from zorefine.models.builtin import build_tokenizer

    tokenizer = build_tokenizer(2048)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64), max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return sum(p.numel() for p in model.parameters()) * 4


def refine(processes: int, model_dir: Path, run_dir: Path, args: argparse.Namespace, *extra: str) -> dict:
    """Run the refine stage in ``processes`` processes and return its summary (refine.json)."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
        "-m", "zorefine", f"hydra.run.dir={run_dir}", f"model.path={model_dir}", "stages=[refine]",
        "refine.method=zo_full", f"refine.steps={args.steps}", f"refine.batch_size={args.batch}", "refine.lr=0.01", *extra,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"zorefine failed with {processes} processes:\n{done.stderr[-3000:]}")
    return json.loads((run_dir / "refine.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16, help="global batch (pairs per step)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per process")
    parser.add_argument("--zero3", action="store_true", help="also time 2 processes with ZeRO-3-partitioned parameters")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="zorefine-bench-dist-") as scratch:
        root = Path(scratch)
        # Library banners (DeepSpeed's accelerator notice) go to stderr: stdout is the JSON.
        with contextlib.redirect_stdout(sys.stderr):
            model_bytes = write_model(root / "model", args.hidden, args.layers)
        one = refine(1, root / "model", root / "one", args)
        two = refine(2, root / "model", root / "two", args)
        result = {
            "model_parameters": model_bytes // 4,
            "model_bytes": model_bytes,
            "global_batch": args.batch,
            "steps": args.steps,
            "threads_per_process": args.threads,
            "bytes_sent_per_step": two["bytes_sent_per_step"],
            "bytes_sent_per_step_over_model_bytes": two["bytes_sent_per_step"] / model_bytes,
            "step_seconds_1": one["step_seconds"],
            "step_seconds_2": two["step_seconds"],
            "throughput_ratio_2_over_1": one["step_seconds"] / two["step_seconds"],
        }
        if args.zero3:
            zero3 = refine(2, root / "model", root / "zero3", args, f"refine.deepspeed={REPO / 'launch/deepspeed/zero3.json'}")
            result["step_seconds_2_zero3"] = zero3["step_seconds"]
            result["zero3_step_over_whole_step"] = zero3["step_seconds"] / two["step_seconds"]
            result["bytes_sent_per_step_zero3_loss_sums"] = zero3["bytes_sent_per_step"]
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
