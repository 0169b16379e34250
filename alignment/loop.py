"""Small helpers the training stages share: model loading, optimiser, step plan, checkpoints, logging, saving.

They are functions, not a trainer class: each stage's `main` reads top to bottom and calls these.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from alignment.runs import write_json, write_jsonl


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


def fp32_master_weights(model, accelerator) -> int:
    """Keep the trainable weights in float32 when the model was loaded in bf16/fp16; returns how many
    tensors were upcast. The launcher's mixed precision (`mixed_precision: bf16`) still runs the matmuls in
    bf16. Without this, AdamW updates of ~lr (1e-5) on weights of ~1e-2 fall below bfloat16's 8-bit
    mantissa and are rounded away: measured on 2 H200s, DPO under DDP with bf16 weights ended at loss 0.88,
    margin 0.15, where ZeRO-2/3 and FSDP2 (float32 masters) reached 0.60, margin 1.24. DeepSpeed keeps its
    own float32 master copy (and casts the module to bf16): left alone there. LoRA: only the adapters
    (and a trained score head) are upcast; the frozen base stays in its dtype. Saving writes the loaded dtype."""
    if accelerator.distributed_type.name == "DEEPSPEED":
        return 0
    n = 0
    for p in model.parameters():  # tied embeddings are one Parameter: upcast once, still tied
        if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()
            n += 1
    return n


@torch.no_grad()
def init_special_embeddings(model, token_ids: list[int]) -> list[int]:
    """Set untrained rows (norm far below the typical row) of the chat-format tokens to the mean embedding.

    Llama 3 base models ship barely trained header/eot embeddings; training through them from ~0 is slow
    and unstable. Returns the ids that were reset."""
    fixed = []
    for emb in {model.get_input_embeddings(), model.get_output_embeddings()}:
        if emb is None:
            continue
        with gathered([emb.weight]):  # ZeRO-3 (zero3_init_flag): the full rows, written back from process 0
            w = emb.weight
            norms = w.float().norm(dim=-1)
            typical = norms.median()
            mean = w.float().mean(0).to(w.dtype)
            for t in token_ids:
                if t < w.shape[0] and norms[t] < 1e-3 * typical:
                    w[t] = mean
                    fixed.append(t)
    return sorted(set(fixed))


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


def grad_norm_value(norm) -> dict:
    """{"train/grad_norm": float} for the log, or {} where the backend reports none."""
    return {} if norm is None else {"train/grad_norm": float(norm)}


def save_model(model, tokenizer, out_dir: str | os.PathLike, accelerator=None) -> None:
    """Save an HF model (safetensors; LoRA merged) and its tokenizer atomically: to a temp dir, then rename.

    With `accelerator`, every process must call it: the full state dict is gathered from the prepared model
    that holds `model` (DDP, DeepSpeed ZeRO-2/3 with stage3_gather_16bit_weights_on_model_save, FSDP2; `model`
    may be the prepared model itself or a module inside it, e.g. the reward scorer's HF model), the main
    process alone writes, and all wait for the write."""
    out_dir = Path(out_dir)
    state = None
    if accelerator is not None:
        accelerator.wait_for_everyone()
        prepared, prefix = _prepared_holding(accelerator, model)
        state = accelerator.get_state_dict(prepared)  # a collective under ZeRO-3 / FSDP
        model = accelerator.unwrap_model(model)
        if accelerator.is_main_process:
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            _write_model(model, tokenizer, out_dir, state)
        accelerator.wait_for_everyone()
        return
    _write_model(model, tokenizer, out_dir, None)


def _prepared_holding(accelerator, model) -> tuple[object, str]:
    """(the prepared model that is or holds `model`, the key prefix of `model` in its state dict)."""
    for prepared in accelerator._models:
        if prepared is model:
            return prepared, ""
        for name, mod in accelerator.unwrap_model(prepared).named_modules():
            if mod is model:
                return prepared, f"{name}." if name else ""
    return model, ""


def _write_model(model, tokenizer, out_dir: Path, state: dict | None) -> None:
    if hasattr(model, "peft_config"):  # LoRA: merged into the base weights, from the (gathered) state dict
        state = merge_lora_state(state if state is not None else model.state_dict(), model)
        model = model.get_base_model()
    loaded = getattr(model.config, "dtype", None)  # the dtype it was loaded in (float32 masters are saved in it)
    loaded = getattr(torch, loaded) if isinstance(loaded, str) else loaded
    cast = loaded if isinstance(loaded, torch.dtype) and loaded != torch.float32 else None
    if cast is not None:
        state = {k: v.to(cast) if v.is_floating_point() else v
                 for k, v in (state if state is not None else model.state_dict()).items()}
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True, state_dict=state)
    if cast is not None:  # save_pretrained wrote the in-memory dtype
        cfg = json.loads((tmp / "config.json").read_text())
        cfg["dtype"] = str(cast).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    tokenizer.save_pretrained(str(tmp))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)


@torch.no_grad()
def merge_lora_state(state: dict, peft_model) -> dict:
    """The base model's state dict with every LoRA adapter merged, W + (B @ A) * scaling, from a peft model's
    full state dict (keys `base_model.model.<name>.base_layer.weight`, `.lora_A.<adapter>.weight`, ...).

    Works on a gathered ZeRO-3 / FSDP state dict, where peft's in-place merge_and_unload cannot (the modules
    hold shards). Matches merge_and_unload (tested). modules_to_save copies (the reward head) replace their
    originals."""
    from peft.tuners.lora import LoraLayer

    adapter = peft_model.active_adapter
    if getattr(peft_model.peft_config[adapter], "use_dora", False):
        raise ValueError("saving a DoRA model is not supported; use plain LoRA")
    state = dict(state)
    for name, mod in peft_model.named_modules():
        if isinstance(mod, LoraLayer) and adapter in mod.lora_A:
            a = state.pop(f"{name}.lora_A.{adapter}.weight").float()
            b = state.pop(f"{name}.lora_B.{adapter}.weight").float()
            w = state[f"{name}.base_layer.weight"]
            delta = (b @ a) * mod.scaling[adapter]
            state[f"{name}.base_layer.weight"] = (w.float() + (delta.T if mod.fan_in_fan_out else delta).to(w.device)).to(w.dtype)
    out = {}
    for k, v in state.items():
        if ".original_module." in k and k.replace(".original_module.", f".modules_to_save.{adapter}.") in state:
            continue
        k = k.removeprefix("base_model.model.").replace(".base_layer.", ".").replace(f".modules_to_save.{adapter}.", ".")
        out[k.replace(".original_module.", ".")] = v
    return out


# -- weight averaging (Llama 3 averaged models at the RM, SFT and DPO stages) ---------------------------------
def snapshot_steps(total: int, cfg) -> list[int]:
    """Optimizer-step counts whose weights are averaged into the final model when `cfg.average_last` = N > 1:
    the final step and the N-1 before it, `average_every` steps apart (default: spread over the last half
    of training). Empty when averaging is off."""
    n = getattr(cfg, "average_last", 0)
    if n <= 1:
        return []
    if getattr(cfg, "lora", None) is not None:
        from alignment.config import ConfigError

        raise ConfigError("average_last does not support LoRA runs yet: average their merged models with "
                          "`python -m alignment.average` (make average)")
    every = cfg.average_every or max(1, total // (2 * n))
    return sorted({total - i * every for i in range(n) if total - i * every >= 1})


def save_snapshot(model, tokenizer, out_dir: Path, step: int, accelerator) -> None:
    save_model(model, tokenizer, out_dir / "snapshots" / f"step-{step}", accelerator)


def average_snapshots(out_dir: Path, steps: list[int], accelerator) -> dict:
    """Replace out_dir/model (the final step's weights) by the mean of it and the earlier snapshots."""
    if not steps:
        return {}
    if accelerator.is_main_process:
        from alignment.average import average_models

        snaps = [out_dir / "snapshots" / f"step-{s}" for s in steps[:-1]]
        missing = [str(p) for p in snaps if not p.exists()]
        if missing:
            raise FileNotFoundError(f"weight snapshots missing for averaging: {', '.join(missing)}")
        average_models(snaps + [out_dir / "model"], out_dir / "model")
        shutil.rmtree(out_dir / "snapshots", ignore_errors=True)
    accelerator.wait_for_everyone()
    return {"averaged_steps": steps}


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
        with local_load(accelerator):  # this process alone: no ZeRO-3 sharding, no synced generation
            policy = load_causal_lm(out_dir / "model", recipe.model.dtype).to(accelerator.device)
            metrics = evaluate_policy(policy, fmt, prompts, recipe.eval, seed=recipe.seed)
        write_jsonl(out_dir / "eval_responses.jsonl", metrics.pop("responses"))
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


def make_accelerator(out_dir: Path, report_to: str, cfg=None, dtype: str = "float32"):
    """The stage's Accelerator, configured by `accelerate launch` (recipes/accelerate/*.yaml) or one process.

    The scheduler steps once per optimizer step whatever the number of processes (plan_steps already counts
    global steps). Under DeepSpeed the stage config `cfg` gives the micro-batch size and gradient clipping,
    and DeepSpeed's own accumulation stays 1: the stages accumulate themselves (micro_batch)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

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


class Throughput:
    """Training speed and memory of a stage run: tokens (non-pad input tokens, all processes) and examples per
    second of the training loop, and the peak GPU memory (max over processes) when on CUDA."""

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.tokens = self.examples = 0
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self.t0 = time.perf_counter()

    def add(self, micro_batches: list[dict], pad_id: int, examples: int) -> None:
        """This process's micro-batches of one step (the pad token is a dedicated one: never content)."""
        self.tokens += sum(int((mb["input_ids"] != pad_id).sum()) for mb in micro_batches)
        self.examples += examples

    def metrics(self) -> dict:
        """Collective (every process calls it)."""
        acc = self.accelerator
        seconds = time.perf_counter() - self.t0
        counts = torch.tensor([self.tokens, self.examples], dtype=torch.float64, device=acc.device)
        if acc.num_processes > 1:
            counts = acc.reduce(counts, "sum")
        out = {"train_seconds": round(seconds, 2), "throughput": round(counts[0].item() / max(seconds, 1e-9), 1),
               "throughput_unit": "tokens/s", "examples_per_s": round(counts[1].item() / max(seconds, 1e-9), 2)}
        if torch.cuda.is_available():
            peak = torch.tensor([torch.cuda.max_memory_allocated() / 2**30], device=acc.device)
            if acc.num_processes > 1:
                peak = acc.reduce(peak, "max")
            out["peak_gpu_mem_gb"] = round(peak.item(), 2)
        return out
