"""First-order supervised fine-tuning on (prompt, response) pairs, with transformers' Trainer.

Used twice: to pretrain the built-in base model on benign instructions, and by the align
stage to add refusal. The loss sees only response tokens unless ``train_on_prompt``.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from contextlib import contextmanager
from typing import Iterator, Mapping, Optional, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainingArguments
from transformers.utils import logging as hf_logging

from zorefine.data.formatting import SFTCollator, encode_example
from zorefine.errors import ConfigError
from zorefine.models.param_masks import freeze_masked

log = logging.getLogger(__name__)


@dataclass
class SFTSettings:
    """Hyper-parameters of one SFT run."""

    epochs: float = 3.0
    lr: float = 2e-3
    batch_size: int = 16
    max_length: int = 256
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    seed: int = 0
    train_on_prompt: bool = False
    deepspeed: Optional[str] = None
    show_progress: bool = True


def run_sft(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[tuple[str, str] | tuple[str, str, bool]],
    settings: SFTSettings,
    trainable: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, float]:
    """Train ``model`` in place on ``pairs`` and return the Trainer's training metrics.

    A third element ``False`` marks a response that was cut (a greedy answer at its token
    limit): no end of sequence is taught after it. ``trainable`` (entry masks, e.g. SSAH's
    redundant units) trains only those entries: every other parameter is frozen, and so is every
    unmasked entry of a masked tensor.
    """
    if trainable is not None:
        with only_entries_trainable(model, trainable, settings.weight_decay):
            return run_sft(model, tokenizer, pairs, settings)
    dataset = [
        encode_example(tokenizer, pair[0], pair[1], settings.max_length, settings.train_on_prompt,
                       ends=pair[2] if len(pair) > 2 else True)
        for pair in pairs
    ]
    use_cpu = not torch.cuda.is_available()
    with tempfile.TemporaryDirectory(prefix="zorefine-sft-") as scratch:
        args = TrainingArguments(
            output_dir=scratch,
            num_train_epochs=settings.epochs,
            learning_rate=settings.lr,
            per_device_train_batch_size=settings.batch_size,
            lr_scheduler_type="cosine",
            warmup_steps=settings.warmup_ratio,
            weight_decay=settings.weight_decay,
            seed=settings.seed,
            data_seed=settings.seed,
            use_cpu=use_cpu,
            bf16=not use_cpu and model.dtype == torch.bfloat16,
            save_strategy="no",
            eval_strategy="no",
            report_to="none",
            logging_strategy="epoch",
            disable_tqdm=not settings.show_progress,
            remove_unused_columns=False,
            # Batches of similar length waste little compute on padding.
            train_sampling_strategy="group_by_length",
            dataloader_num_workers=0,
            deepspeed=settings.deepspeed,
        )
        previous_verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            model.train()
            trainer = Trainer(
                model=model,
                args=args,
                train_dataset=dataset,
                data_collator=SFTCollator(tokenizer.pad_token_id),
                processing_class=tokenizer,
            )
            result = trainer.train()
        finally:
            hf_logging.set_verbosity(previous_verbosity)
            model.eval()
    return {key: float(value) for key, value in result.metrics.items() if isinstance(value, (int, float))}


@contextmanager
def only_entries_trainable(model: PreTrainedModel, trainable: Mapping[str, torch.Tensor], weight_decay: float) -> Iterator[None]:
    """Within the block, only the entries ``trainable`` marks receive gradients."""
    if weight_decay:
        # Decoupled weight decay shrinks every entry the optimizer holds, gradient or not.
        raise ConfigError("training a unit set needs weight_decay=0: weight decay would move the frozen entries")
    params = dict(model.named_parameters())
    flags = {name: p.requires_grad for name, p in params.items()}
    for name, param in params.items():
        param.requires_grad_(name in trainable)
    handles = freeze_masked(params, {name: ~mask.bool() for name, mask in trainable.items()})
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for name, param in params.items():
            param.requires_grad_(flags[name])
