"""What the training stages need from accelerate and DeepSpeed: the Accelerator, micro-batches that sync
gradients only on the last one, ZeRO-3 gathering, one-process loading, and each process's slice of a batch.

The private accelerate/DeepSpeed/transformers calls the project makes live here and nowhere else.
"""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration


def gathered(params, modifier_rank: int | None = 0):
    """Context in which DeepSpeed ZeRO-3 partitioned parameters are whole (and, with `modifier_rank`, what
    that process writes into them is kept on exit); a no-op for ordinary parameters. Every process must enter."""
    params = [p for p in params if hasattr(p, "ds_id")]
    if not params:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


@contextmanager
def local_load(accelerator=None):
    """Context for loading a model on ONE process (evaluation on the main process): transformers' DeepSpeed
    ZeRO-3 init (zero3_init_flag: every model created is sharded, which needs every process) is off meanwhile.
    (accelerate's zero3_init_context_manager(enable=False) leaves transformers' ZeRO-3 config in place.)"""
    import transformers.integrations.deepspeed as hf_ds

    ref = getattr(hf_ds, "_hf_deepspeed_config_weak_ref", None)
    if ref is None:
        yield
        return
    hf_ds._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = ref


@contextmanager
def micro_batch(accelerator, model, last: bool):
    """One micro-batch of an optimizer step (the stages accumulate gradients themselves): gradients are
    synchronised over the processes only on the `last` one. Under DeepSpeed, where `accelerator.backward`
    also steps the engine, the engine steps (clipping, optimizer) only on the last one too."""
    if accelerator.distributed_type.name == "DEEPSPEED":
        accelerator.gradient_state._set_sync_gradients(last)
        try:
            yield
        finally:
            accelerator.gradient_state._set_sync_gradients(True)
    elif last or accelerator.num_processes == 1:
        yield
    else:
        with accelerator.no_sync(model):
            yield


def make_accelerator(out_dir: Path, report_to: str, cfg=None, dtype: str = "float32"):
    """The stage's Accelerator, configured by `accelerate launch` (recipes/accelerate/*.yaml) or one process.

    The scheduler steps once per optimizer step whatever the number of processes (plan_steps already counts
    global steps). Under DeepSpeed the stage config `cfg` gives the micro-batch size and gradient clipping,
    and DeepSpeed's own accumulation stays 1: the stages accumulate themselves (micro_batch)."""
    log_with = None if report_to in ("none", "", None) else report_to
    # a launcher's config sets the mixed precision; run alone, a bf16/fp16 recipe computes in its dtype
    mixed = None if os.environ.get("ACCELERATE_MIXED_PRECISION") else {"bfloat16": "bf16", "float16": "fp16"}.get(dtype)
    acc = Accelerator(log_with=log_with, step_scheduler_with_optimizer=False, mixed_precision=mixed,
                      project_config=ProjectConfiguration(project_dir=str(out_dir), logging_dir=str(out_dir / "logs")))
    plugin = getattr(acc.state, "deepspeed_plugin", None)
    if plugin is not None and cfg is not None:
        ds = plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = cfg.batch_size
        ds["gradient_accumulation_steps"] = 1
        ds["train_batch_size"] = cfg.batch_size * acc.num_processes
        ds["gradient_clipping"] = cfg.max_grad_norm
    return acc


def rank_slice(indices: list[int], rank: int, world_size: int) -> list[int]:
    n = len(indices) // world_size
    return indices[rank * n : (rank + 1) * n]

