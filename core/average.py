"""Model averaging: the element-wise mean of several models' weights (Llama 3 averaged the models of
experiments with different data or hyperparameters at the reward model, SFT and DPO stages).

    python -m core.average OUT_DIR MODEL_DIR MODEL_DIR [...]        # runs of a stage (make average)
    sft.average_last: 3   (also reward., dpo.)                            # snapshots of one run, in the recipe

The models must share architecture, parameter names and shapes, and tokenizer (same template hash). Each
safetensors file is averaged on its own, in float32, and saved in its own dtype, so memory holds one shard
at a time (sharded 8B checkpoints work). Config, tokenizer and the rest come from the first model.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from data.chat_format import load_tokenizer

WEIGHT_SUFFIX = ".safetensors"


class AverageError(ValueError):
    pass


def _check_same(dirs: list[Path]) -> list[str]:
    """The safetensors file names every model shares; AverageError naming the first difference."""
    first = dirs[0]
    for d in dirs:
        if not d.is_dir():
            raise AverageError(f"{d}: not a model folder")
        if not sorted(p.name for p in d.glob(f"*{WEIGHT_SUFFIX}")):
            raise AverageError(f"{d}: no .safetensors weights (only safetensors are loaded)")
    files = sorted(p.name for p in first.glob(f"*{WEIGHT_SUFFIX}"))
    cfg0 = json.loads((first / "config.json").read_text()) if (first / "config.json").exists() else {}
    for d in dirs[1:]:
        if sorted(p.name for p in d.glob(f"*{WEIGHT_SUFFIX}")) != files:
            raise AverageError(f"{d}: weight files differ from {first}'s")
        cfg = json.loads((d / "config.json").read_text()) if (d / "config.json").exists() else {}
        for key in ("architectures", "hidden_size", "num_hidden_layers", "vocab_size", "num_labels"):
            if cfg.get(key) != cfg0.get(key):
                raise AverageError(f"{d}: config {key}={cfg.get(key)!r} differs from {first}'s {cfg0.get(key)!r}")
    if (first / "tokenizer.json").exists():
        h0 = load_tokenizer(first).template_hash()
        for d in dirs[1:]:
            if not (d / "tokenizer.json").exists() or load_tokenizer(d).template_hash() != h0:
                raise AverageError(f"{d}: tokenizer/chat template differs from {first}'s")
    return files


def average_tensors(states: list[dict[str, torch.Tensor]], weights: list[float] | None = None) -> dict[str, torch.Tensor]:
    """sum_i w_i * state_i[name] for every name (w_i = 1/n by default), accumulated in float32, cast back."""
    n = len(states)
    w = weights or [1.0 / n] * n
    names = list(states[0])
    for i, s in enumerate(states[1:], 1):
        if list(s) != names:
            missing = sorted(set(names) ^ set(s))[:3]
            raise AverageError(f"model {i} has other parameter names (e.g. {missing})")
    out = {}
    for name in names:
        ref = states[0][name]
        if any(s[name].shape != ref.shape for s in states):
            raise AverageError(f"parameter {name}: shapes differ {[tuple(s[name].shape) for s in states]}")
        if not ref.is_floating_point():  # integer buffers are copied, not averaged
            out[name] = ref.clone()
            continue
        acc = torch.zeros(ref.shape, dtype=torch.float32)
        for wi, s in zip(w, states):
            acc += wi * s[name].float()
        out[name] = acc.to(ref.dtype)
    return out


def average_models(dirs: list[str | Path], out: str | Path, weights: list[float] | None = None) -> Path:
    """Write the average of model folders `dirs` into `out` (atomic: a temp folder renamed over it).
    `out` may be one of `dirs`."""
    dirs = [Path(d) for d in dirs]
    out = Path(out)
    if len(dirs) < 2:
        raise AverageError("averaging needs at least two models")
    if weights is not None and (len(weights) != len(dirs) or abs(sum(weights) - 1) > 1e-6):
        raise AverageError("weights must be one per model and sum to 1")
    files = _check_same(dirs)
    tmp = out.parent / f".{out.name}.avg.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(dirs[0], tmp, ignore=shutil.ignore_patterns(f"*{WEIGHT_SUFFIX}"))
    for name in files:
        states, metadata = [], None
        for d in dirs:
            with safe_open(str(d / name), framework="pt") as f:
                metadata = metadata if metadata is not None else f.metadata()
                states.append({k: f.get_tensor(k) for k in f.keys()})
        save_file(average_tensors(states, weights), str(tmp / name), metadata=metadata or {"format": "pt"})
        del states
    (tmp / "averaged_from.json").write_text(json.dumps({"models": [str(d) for d in dirs], "weights": weights}, indent=1))
    old = out.parent / f".{out.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="output model folder")
    ap.add_argument("models", nargs="+", help="model folders to average (two or more)")
    ap.add_argument("--weights", type=float, nargs="+", help="one weight per model, summing to 1 (default: equal)")
    args = ap.parse_args(argv)
    try:
        path = average_models(args.models, args.out, args.weights)
    except (AverageError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"averaged {len(args.models)} models -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
