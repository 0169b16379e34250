"""Checkpoints (resume after a kill) and weight snapshots (averaged into the final model).

A checkpoint is accelerate's state (model, optimiser, scheduler, RNG) plus a marker written last, so a torn
save is ignored; a resumed run sees exactly the batches it would have seen (core.optim.plan_steps).

Fail-safe runs: a NaN/Inf loss or gradient norm stops the stage (NonFiniteError, exit code 3 in pipeline.run)
before anything is saved, or skips that update (`nan_policy: skip_step`); SIGTERM/SIGINT during the loop ends
the current optimizer step, writes a checkpoint and exits 143/130, and the same command resumes from it.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from core.average import average_models
from core.models import drop_quant_state, save_model
from core.runs import hash_obj
from core.tracking import TrainLog
from data.io import read_json, write_json

SIGNAL_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + the signal number, as a shell reports it


class NonFiniteError(RuntimeError):
    """A training stage's loss or gradient norm is NaN/Inf: the stage stops before writing a model (its last
    good checkpoint is kept); pipeline.run prints the message as one line and exits 3."""


def non_finite(loss, grad_norm) -> str | None:
    """'loss nan' or 'grad norm inf' for the first non-finite value, None when all are finite. grad_norm None
    (DeepSpeed reports none): the loss alone."""
    for name, value in (("loss", loss), ("grad norm", grad_norm)):
        if value is not None and not math.isfinite(float(value)):
            return f"{name} {float(value)}"
    return None


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


def save_checkpoint(accelerator, ckpt_dir: Path, step: int, config_hash: str, keep: int = 1, state: dict | None = None) -> None:
    """accelerate state (model, optimiser, scheduler, RNG) + a marker written last, so a torn save is ignored.
    `state`: the run's own bookkeeping (TrainRun.state), kept in the marker."""
    d = ckpt_dir / f"step-{step}"
    accelerator.save_state(str(d), safe_serialization=True)
    if accelerator.is_main_process:
        write_json(d / "checkpoint.json", {**(state or {}), "step": step, "config_hash": config_hash})
        old = sorted((p for p in ckpt_dir.glob("step-*") if p != d), key=lambda p: int(p.name.split("-")[1]))
        for p in old[: max(0, len(old) - keep + 1)]:
            shutil.rmtree(p, ignore_errors=True)
    accelerator.wait_for_everyone()


@dataclass
class TrainRun:
    """The bookkeeping of one training stage's run: where its checkpoints go, the step it starts at, its log,
    and the steps whose weights are snapshotted for averaging. The stage's loop calls `step_ok` between
    clip_grad_norm_ and optimizer.step, and `log_step` and `end_step` after every step; the model is the
    stage's to save, with `finish`.

    first_loss, last_loss and skipped_steps are the whole run's, across resumes (kept in the checkpoints);
    `signum` is the first SIGTERM/SIGINT received during the loop (see catch_signals)."""

    accelerator: object
    out_dir: Path
    cfg: object
    n_steps: int
    ckpt_dir: Path
    config_hash: str
    start: int
    log: TrainLog
    snapshots: list[int] = field(default_factory=list)
    stage: str = "train"  # the name in messages
    first_loss: float | None = None
    last_loss: float | None = None
    skipped_steps: int = 0
    bad_in_a_row: int = 0
    signum: int | None = None
    previous_handlers: dict = field(default_factory=dict)  # signal -> its handler before catch_signals

    # -- non-finite steps ------------------------------------------------------------------------------
    def step_ok(self, step: int, loss: float, grad_norm) -> bool:
        """Call after clip_grad_norm_, before optimizer.step. True: loss and gradient norm are finite, step the
        optimizer and scheduler. False (nan_policy skip_step): skip both; the loop's zero_grad drops the bad
        gradients. Raises NonFiniteError under `stop`, after `max_bad_steps` bad steps in a row, or under
        DeepSpeed, whose engine has already stepped inside backward (there is no update left to skip)."""
        if self.accelerator.mixed_precision == "fp16":
            grad_norm = None  # fp16: an overflowing gradient is the loss scaler's to skip (it lowers its scale)
        bad = non_finite(loss, grad_norm)
        if bad is None:
            self.bad_in_a_row = 0
            self.first_loss = float(loss) if self.first_loss is None else self.first_loss
            self.last_loss = float(loss)
            return True
        self.bad_in_a_row += 1
        deepspeed = self.accelerator.distributed_type.name == "DEEPSPEED"
        if self.cfg.nan_policy == "stop" or self.bad_in_a_row >= self.cfg.max_bad_steps or deepspeed:
            self.restore_signals()
            self.log.close()
            raise NonFiniteError(self.non_finite_message(step, bad, deepspeed))
        self.skipped_steps += 1
        if getattr(self.accelerator, "scaler", None) is not None:
            self.accelerator.scaler.update()  # fp16: clip_grad_norm_ unscaled these gradients; without an update
            # the next step's unscale_ raises (optimizer.step would have called it)
        self.accelerator.print(f"warning: {self.stage}: step {step}: non-finite {bad}, update skipped "
                               f"({self.bad_in_a_row} in a row; {self.cfg.max_bad_steps} stop the stage)")
        return False

    def non_finite_message(self, step: int, bad: str, deepspeed: bool = False) -> str:
        policy = f"nan_policy: {self.cfg.nan_policy}"
        if deepspeed and self.cfg.nan_policy == "skip_step":
            policy += ", but DeepSpeed steps inside backward"
        elif self.cfg.nan_policy == "skip_step":
            policy += f", {self.bad_in_a_row} bad steps in a row"
        ckpt, _ = latest_checkpoint(self.ckpt_dir, self.config_hash)
        kept = f"last good checkpoint kept: {ckpt}" if ckpt else "no checkpoint yet"
        return f"{self.stage}: step {step}: non-finite {bad} ({policy}); no model written, {kept}"

    # -- SIGTERM / SIGINT ------------------------------------------------------------------------------
    def catch_signals(self) -> None:
        """The first SIGTERM/SIGINT only sets `signum`: end_step then checkpoints after the current optimizer
        step and exits, so a job scheduler's stop costs no work. A second one does what it did before."""
        if threading.current_thread() is not threading.main_thread():
            return  # Python runs signal handlers in the main thread only
        for sig in SIGNAL_EXIT:
            prev = signal.getsignal(sig)
            owner = getattr(prev, "__self__", None)
            if isinstance(owner, TrainRun):  # left by a stage that raised (an in-process caller): not ours to chain
                prev = owner.previous_handlers.get(sig, signal.SIG_DFL)
            self.previous_handlers[sig] = prev if prev is not None else signal.SIG_DFL
            signal.signal(sig, self.on_signal)

    def on_signal(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum
            return
        self.restore_signals()
        signal.raise_signal(signum)  # the second one, to the previous handler

    def restore_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, handler in self.previous_handlers.items():
            signal.signal(sig, handler)
        self.previous_handlers = {}

    def agreed_signal(self) -> int | None:
        """The signal to stop at, the same on every process: each got its own copy, maybe a step apart, and
        every process must checkpoint (a collective) at the same step."""
        sig = self.signum or 0
        if self.accelerator.num_processes > 1:
            sig = int(self.accelerator.reduce(torch.tensor([sig], device=self.accelerator.device), "max").item())
        return sig or None

    def interrupt(self, done: int, signum: int, saved: bool) -> None:
        """Checkpoint at `done` steps (unless end_step just did) and exit 128 + the signal number."""
        if not saved:
            self.save(done)
        self.log.close()
        self.restore_signals()
        if self.accelerator.is_main_process:
            print(f"interrupted ({signal.Signals(signum).name}) at step {done}: checkpoint saved to "
                  f"{self.ckpt_dir / f'step-{done}'}; rerun the same command to resume", file=sys.stderr, flush=True)
        raise SystemExit(SIGNAL_EXIT.get(signum, 128 + signum))

    # -- after each step -------------------------------------------------------------------------------
    @property
    def state(self) -> dict:
        return {"first_loss": self.first_loss, "last_loss": self.last_loss, "skipped_steps": self.skipped_steps}

    def save(self, done: int) -> None:
        save_checkpoint(self.accelerator, self.ckpt_dir, done, self.config_hash, state=self.state)

    def log_step(self, step: int, values: dict) -> None:
        if step % self.cfg.log_every == 0 or step == self.n_steps - 1:
            self.log.log(step, values)

    def end_step(self, step: int, model, tokenizer) -> None:
        """After optimizer step `step` (0-based): a weight snapshot for averaging, a checkpoint every
        `save_every` steps, and after a SIGTERM/SIGINT a checkpoint and the exit. `model` is what save_model
        writes (the reward stage's HF model inside its scorer)."""
        done = step + 1
        if done in self.snapshots[:-1]:
            save_snapshot(model, tokenizer, self.out_dir, done, self.accelerator)
        saved = bool(self.cfg.save_every and done % self.cfg.save_every == 0 and done < self.n_steps)
        if saved:
            self.save(done)
        signum = self.agreed_signal()
        if signum is not None:
            self.interrupt(done, signum, saved)

    def finish(self, model, tokenizer) -> dict:
        """Close the log, save the final model (out_dir/model; with LoRA the adapters too, out_dir/adapter), average
        it with the snapshots when asked. Returns the run's metrics: skipped_steps, and averaged_steps when averaging."""
        self.log.close()
        self.restore_signals()  # saving the model and evaluating: a signal stops them as usual
        save_model(model, tokenizer, self.out_dir / "model", self.accelerator, adapter_dir=self.out_dir / "adapter")
        return {"skipped_steps": self.skipped_steps, **average_snapshots(self.out_dir, self.snapshots, self.accelerator)}


def start_or_resume(accelerator, out_dir: Path, recipe, inputs: dict, cfg, n_steps: int, stage: str = "train") -> TrainRun:
    """A stage run: resumed from the newest complete checkpoint made with the same recipe and inputs
    (accelerate restores model, optimiser, scheduler and RNG; the log loses the steps after it, which run
    again), or started at step 0 with a fresh log. SIGTERM/SIGINT are caught until `finish`.
    Call it after accelerator.prepare."""
    config_hash = hash_obj({"recipe": recipe.to_dict(), "inputs": {k: str(v) for k, v in inputs.items()}})
    ckpt_dir = out_dir / "checkpoints"
    accelerator.register_save_state_pre_hook(drop_quant_state)  # QLoRA: checkpoints that load back
    ckpt, start = latest_checkpoint(ckpt_dir, config_hash)
    log = TrainLog(out_dir, accelerator, cfg.report_to, vars(cfg))
    run = TrainRun(accelerator, out_dir, cfg, n_steps, ckpt_dir, config_hash, start, log, snapshot_steps(n_steps, cfg), stage)
    if ckpt is not None:
        accelerator.load_state(str(ckpt))
        log.truncate(start)
        kept = read_json(ckpt / "checkpoint.json")
        run.first_loss, run.last_loss = kept.get("first_loss"), kept.get("last_loss")
        run.skipped_steps = kept.get("skipped_steps", 0)
        accelerator.print(f"resumed from {ckpt} (step {start})")
    else:
        log.reset()
    run.catch_signals()
    return run


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

