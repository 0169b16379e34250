"""Small helpers the training stages share: model loading, optimiser, step plan, checkpoints, logging, saving.

They are functions, not a trainer class: each stage's `main` reads top to bottom and calls these.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from pathlib import Path

import torch

from alignment.runs import write_json


# -- models -------------------------------------------------------------------------------------------
def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_causal_lm(path: str | os.PathLike, dtype: str = "float32"):
    """A local HF causal LM, safetensors only, no remote code."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype(dtype), use_safetensors=True, trust_remote_code=False)


def apply_lora(model, lora_cfg, task_type: str = "CAUSAL_LM"):
    """Wrap `model` with peft LoRA adapters when the stage config asks for them.

    task_type: CAUSAL_LM for policies; SEQ_CLS for the reward model (its score head stays fully trained)."""
    if lora_cfg is None:
        return model
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                     target_modules=list(lora_cfg.target_modules), task_type=task_type)
    return get_peft_model(model, cfg)


@torch.no_grad()
def init_special_embeddings(model, token_ids: list[int]) -> list[int]:
    """Set untrained rows (norm far below the typical row) of the chat-format tokens to the mean embedding.

    Llama 3 base models ship barely trained header/eot embeddings; training through them from ~0 is slow
    and unstable. Returns the ids that were reset."""
    fixed = []
    for emb in {model.get_input_embeddings(), model.get_output_embeddings()}:
        if emb is None:
            continue
        w = emb.weight
        norms = w.float().norm(dim=-1)
        typical = norms.median()
        mean = w.float().mean(0).to(w.dtype)
        for t in token_ids:
            if t < w.shape[0] and norms[t] < 1e-3 * typical:
                w[t] = mean
                fixed.append(t)
    return sorted(set(fixed))


def save_model(model, tokenizer, out_dir: str | os.PathLike, accelerator=None) -> None:
    """Save an HF model (safetensors; LoRA merged) and its tokenizer atomically: to a temp dir, then rename."""
    out_dir = Path(out_dir)
    if accelerator is not None:
        accelerator.wait_for_everyone()
        model = accelerator.unwrap_model(model)
        state = accelerator.get_state_dict(model) if accelerator.distributed_type.name == "DEEPSPEED" else None
        if not accelerator.is_main_process:
            return
    else:
        state = None
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
        state = None
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True, state_dict=state)
    tokenizer.save_pretrained(str(tmp))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)


# -- optimisation ---------------------------------------------------------------------------------------
def make_optimizer(model, cfg, total_steps: int):
    """AdamW on trainable parameters with linear warmup then cosine decay to 10% of the peak lr."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    warmup = max(1, int(cfg.warmup_ratio * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def plan_steps(n_examples: int, cfg, world_size: int, seed: int) -> list[list[list[int]]]:
    """The whole run's data order: per optimizer step, per micro-batch, the example indices of this run.

    Deterministic in `seed`, so a resumed run sees exactly the batches it would have seen. Each
    process takes its own slice of every step's examples (data parallel)."""
    per_step = cfg.batch_size * cfg.grad_accum * world_size
    if cfg.max_steps > 0:
        total = cfg.max_steps
    else:
        total = max(1, math.ceil(cfg.epochs * n_examples / per_step))
    rng = random.Random(seed)
    order: list[int] = []
    while len(order) < total * per_step:
        perm = list(range(n_examples))
        rng.shuffle(perm)
        order += perm
    steps = []
    for s in range(total):
        chunk = order[s * per_step : (s + 1) * per_step]
        steps.append([chunk[m * cfg.batch_size * world_size : (m + 1) * cfg.batch_size * world_size] for m in range(cfg.grad_accum)])
    return steps


def rank_slice(indices: list[int], rank: int, world_size: int) -> list[int]:
    n = len(indices) // world_size
    return indices[rank * n : (rank + 1) * n]


# -- checkpoints ------------------------------------------------------------------------------------------
def latest_checkpoint(ckpt_dir: Path, config_hash: str) -> tuple[Path | None, int]:
    """The newest complete checkpoint made with the same config, and its step (0 if none)."""
    best, best_step = None, 0
    if not ckpt_dir.exists():
        return None, 0
    for d in ckpt_dir.glob("step-*"):
        info = d / "checkpoint.json"
        if not info.exists():
            continue  # killed while saving
        meta = json.loads(info.read_text())
        if meta.get("config_hash") == config_hash and meta["step"] > best_step:
            best, best_step = d, meta["step"]
    return best, best_step


def save_checkpoint(accelerator, ckpt_dir: Path, step: int, config_hash: str, keep: int = 1) -> None:
    """accelerate state (model, optimiser, scheduler, RNG) + a marker written last, so a torn save is ignored."""
    d = ckpt_dir / f"step-{step}"
    accelerator.save_state(str(d), safe_serialization=True)
    if accelerator.is_main_process:
        write_json(d / "checkpoint.json", {"step": step, "config_hash": config_hash})
        old = sorted((p for p in ckpt_dir.glob("step-*") if p != d), key=lambda p: int(p.name.split("-")[1]))
        for p in old[: max(0, len(old) - keep + 1)]:
            shutil.rmtree(p, ignore_errors=True)
    accelerator.wait_for_everyone()


def start_or_resume(accelerator, out_dir: Path, recipe, inputs: dict, cfg):
    """Checkpoint folder, config hash, first step and training log of a stage run.

    Resumes from the newest complete checkpoint made with the same recipe and inputs (accelerate restores
    model, optimiser, scheduler and RNG); otherwise starts at step 0 with a fresh log."""
    from alignment.runs import hash_obj

    config_hash = hash_obj({"recipe": recipe.to_dict(), "inputs": {k: str(v) for k, v in inputs.items()}})
    ckpt_dir = out_dir / "checkpoints"
    ckpt, start = latest_checkpoint(ckpt_dir, config_hash)
    log = TrainLog(out_dir, accelerator, cfg.report_to, vars(cfg))
    if ckpt is not None:
        accelerator.load_state(str(ckpt))
        accelerator.print(f"resumed from {ckpt} (step {start})")
    else:
        log.reset()
    return ckpt_dir, config_hash, start, log


def finish_policy(accelerator, out_dir: Path, recipe, fmt, inputs: dict, ckpt_dir: Path) -> dict:
    """After a policy is saved: its gold-judge figures on the eval prompts (if any); checkpoints removed."""
    metrics = {}
    if accelerator.is_main_process and inputs.get("eval_prompts"):
        from data.validate import load_prompts
        from evals.gold import evaluate_policy

        prompts, _ = load_prompts(inputs["eval_prompts"])
        policy = load_causal_lm(out_dir / "model", recipe.model.dtype)
        metrics = evaluate_policy(policy, fmt, prompts, recipe.eval, seed=recipe.seed)
    if accelerator.is_main_process:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    return metrics


# -- logging ------------------------------------------------------------------------------------------------
class TrainLog:
    """Training curves: appended to `train_log.jsonl` (the dashboard reads it) and sent to TensorBoard etc."""

    def __init__(self, out_dir: Path, accelerator, report_to: str, config: dict):
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / "train_log.jsonl"
        self.accelerator = accelerator
        self.main = accelerator.is_main_process
        self.trackers = report_to not in ("none", "", None)
        if self.trackers:
            accelerator.init_trackers("train", config={k: v for k, v in config.items() if isinstance(v, (int, float, str, bool))})

    def log(self, step: int, values: dict) -> None:
        if not self.main:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **{k: round(float(v), 6) for k, v in values.items()}}) + "\n")
        if self.trackers:
            self.accelerator.log(values, step=step)

    def reset(self) -> None:
        if self.main and self.path.exists():
            self.path.unlink()

    def close(self) -> None:
        if self.trackers:
            self.accelerator.end_training()


def make_accelerator(out_dir: Path, report_to: str):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    log_with = None if report_to in ("none", "", None) else report_to
    return Accelerator(log_with=log_with, project_config=ProjectConfiguration(project_dir=str(out_dir), logging_dir=str(out_dir / "logs")))
