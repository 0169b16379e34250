"""Training curves (train_log.jsonl, TensorBoard/wandb/trackio) and throughput/memory figures."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm


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


def grad_norm_value(norm) -> dict:
    """{"train/grad_norm": float} for the log, or {} where the backend reports none."""
    return {} if norm is None else {"train/grad_norm": float(norm)}


# -- progress ------------------------------------------------------------------------------------------
LOG_INTERVAL_S = 30.0  # not on a terminal: at most one progress line this often


class _Lines:
    """tqdm's output as whole lines: tqdm redraws a bar with '\r', which in a log file piles up into one
    endless line; here every refresh becomes one line."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, s: str) -> None:
        s = s.replace("\r", "").rstrip()
        if s:
            self.stream.write(s + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress(iterable=None, *, desc: str, disable: bool = False, **kw):
    """A progress bar on a terminal; elsewhere (`make pipeline > run.log`) a progress line every
    LOG_INTERVAL_S seconds at most, so that a run's log is lines, not megabytes of bars."""
    if sys.stderr.isatty():
        return tqdm(iterable, desc=desc, disable=disable, **kw)
    return tqdm(iterable, desc=desc, disable=disable, file=_Lines(sys.stderr), mininterval=LOG_INTERVAL_S, ncols=100, **kw)


def quiet_library_bars() -> None:
    """Off a terminal, the libraries' own tqdm bars (transformers, vLLM) refresh every LOG_INTERVAL_S too
    (tqdm reads TQDM_* environment variables); subprocesses inherit it."""
    if not sys.stderr.isatty():
        os.environ.setdefault("TQDM_MININTERVAL", str(LOG_INTERVAL_S))

