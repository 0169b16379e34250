"""Checkpoints (resume after a kill) and weight snapshots (averaged into the final model).

A checkpoint is accelerate's state (model, optimiser, scheduler, RNG) plus a marker written last, so a torn
save is ignored; a resumed run sees exactly the batches it would have seen (core.optim.plan_steps).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from core.average import average_models
from core.models import save_model
from core.runs import hash_obj
from core.tracking import TrainLog
from data.io import write_json


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


@dataclass
class TrainRun:
    """The bookkeeping of one training stage's run: where its checkpoints go, the step it starts at, its log,
    and the steps whose weights are snapshotted for averaging. The stage's loop calls `log_step` and
    `end_step` after every optimizer step; the model is the stage's to save."""

    accelerator: object
    out_dir: Path
    cfg: object
    n_steps: int
    ckpt_dir: Path
    config_hash: str
    start: int
    log: TrainLog
    snapshots: list[int] = field(default_factory=list)

    def log_step(self, step: int, values: dict) -> None:
        if step % self.cfg.log_every == 0 or step == self.n_steps - 1:
            self.log.log(step, values)

    def end_step(self, step: int, model, tokenizer) -> None:
        """After optimizer step `step` (0-based): a weight snapshot for averaging, and a checkpoint every
        `save_every` steps. `model` is what save_model writes (the reward stage's HF model inside its scorer)."""
        done = step + 1
        if done in self.snapshots[:-1]:
            save_snapshot(model, tokenizer, self.out_dir, done, self.accelerator)
        if self.cfg.save_every and done % self.cfg.save_every == 0 and done < self.n_steps:
            save_checkpoint(self.accelerator, self.ckpt_dir, done, self.config_hash)

    def finish(self, model, tokenizer) -> dict:
        """Close the log, save the final model (out_dir/model), average it with the snapshots when asked."""
        self.log.close()
        save_model(model, tokenizer, self.out_dir / "model", self.accelerator)
        return average_snapshots(self.out_dir, self.snapshots, self.accelerator)


def start_or_resume(accelerator, out_dir: Path, recipe, inputs: dict, cfg, n_steps: int) -> TrainRun:
    """A stage run: resumed from the newest complete checkpoint made with the same recipe and inputs
    (accelerate restores model, optimiser, scheduler and RNG), or started at step 0 with a fresh log.
    Call it after accelerator.prepare."""
    config_hash = hash_obj({"recipe": recipe.to_dict(), "inputs": {k: str(v) for k, v in inputs.items()}})
    ckpt_dir = out_dir / "checkpoints"
    ckpt, start = latest_checkpoint(ckpt_dir, config_hash)
    log = TrainLog(out_dir, accelerator, cfg.report_to, vars(cfg))
    if ckpt is not None:
        accelerator.load_state(str(ckpt))
        accelerator.print(f"resumed from {ckpt} (step {start})")
    else:
        log.reset()
    return TrainRun(accelerator, out_dir, cfg, n_steps, ckpt_dir, config_hash, start, log, snapshot_steps(n_steps, cfg))


def snapshot_steps(total: int, cfg) -> list[int]:
    """Optimizer-step counts whose weights are averaged into the final model when `cfg.average_last` = N > 1:
    the final step and the N-1 before it, `average_every` steps apart (default: spread over the last half
    of training). Empty when averaging is off."""
    n = cfg.average_last
    if n <= 1:
        return []
    every = cfg.average_every or max(1, total // (2 * n))
    return sorted({total - i * every for i in range(n) if total - i * every >= 1})


def save_snapshot(model, tokenizer, out_dir: Path, step: int, accelerator) -> None:
    save_model(model, tokenizer, out_dir / "snapshots" / f"step-{step}", accelerator)


def average_snapshots(out_dir: Path, steps: list[int], accelerator) -> dict:
    """Replace out_dir/model (the final step's weights) by the mean of it and the earlier snapshots."""
    if not steps:
        return {}
    if accelerator.is_main_process:
        snaps = [out_dir / "snapshots" / f"step-{s}" for s in steps[:-1]]
        missing = [str(p) for p in snaps if not p.exists()]
        if missing:
            raise FileNotFoundError(f"weight snapshots missing for averaging: {', '.join(missing)}")
        average_models(snaps + [out_dir / "model"], out_dir / "model")
        shutil.rmtree(out_dir / "snapshots", ignore_errors=True)
    accelerator.wait_for_everyone()
    return {"averaged_steps": steps}

