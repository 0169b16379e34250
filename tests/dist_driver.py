"""Runs `pipeline.run` (same arguments) while recording every file this process writes.

    accelerate launch --cpu --num_processes 2 -m tests.dist_driver RECIPE --stage sft [key=value ...]

tests/test_distributed.py uses it to check that a multi-process run writes each file once: with
WRITE_LOG set to a folder, each process appends `{"rank", "op", "path"}` lines to WRITE_LOG/writes-<rank>.jsonl
for every os.replace / os.rename (the atomic writes and the model folder's final rename), safetensors file
and torch.save.
"""

from __future__ import annotations

import json
import os
import sys


def _record(op: str, path) -> None:
    log = os.environ.get("WRITE_LOG")
    if not log:
        return
    rank = int(os.environ.get("RANK", "0"))
    with open(os.path.join(log, f"writes-{rank}.jsonl"), "a") as f:
        f.write(json.dumps({"rank": rank, "op": op, "path": os.path.abspath(str(path))}) + "\n")


def _patch() -> None:
    import safetensors.torch
    import torch

    real_replace, real_rename, real_save_file, real_torch_save = os.replace, os.rename, safetensors.torch.save_file, torch.save

    def replace(src, dst, *a, **k):
        _record("replace", dst)
        return real_replace(src, dst, *a, **k)

    def rename(src, dst, *a, **k):
        _record("rename", dst)
        return real_rename(src, dst, *a, **k)

    def save_file(tensors, filename, *a, **k):
        _record("safetensors", filename)
        return real_save_file(tensors, filename, *a, **k)

    def torch_save(obj, f, *a, **k):
        if isinstance(f, (str, os.PathLike)):
            _record("torch.save", f)
        return real_torch_save(obj, f, *a, **k)

    os.replace, os.rename, safetensors.torch.save_file, torch.save = replace, rename, save_file, torch_save


def _deepspeed_on_cpu() -> None:
    """accelerate runs DeepSpeed on CUDA only; on a CPU host (DeepSpeed's CPU accelerator, gloo) tell its state
    to use gloo with CPU devices, so the ZeRO code paths (sharded save, reference engine) run in CI."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    PartialState._prepare_backend = lambda self, cpu=False, sagemaker_dp=False, backend=None: ("gloo", DistributedType.MULTI_CPU)


if __name__ == "__main__":
    _patch()
    if os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true" and os.environ.get("DEEPSPEED_ON_CPU") == "1":
        _deepspeed_on_cpu()
    from pipeline.run import main

    sys.exit(main(sys.argv[1:]))
