"""Training curves (train_log.jsonl, TensorBoard/wandb/trackio) and throughput/memory figures."""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from data.io import write_jsonl


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

    def truncate(self, step: int) -> None:
        """Keep the lines of the steps before `step` (a resumed run's checkpoint): the steps after it were
        logged by the killed run and are logged again, and the curve must not hold them twice. Atomic, so a
        kill here leaves the old log."""
        if not (self.main and self.path.exists()):
            return
        kept = []
        with open(self.path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # the last line, torn by the kill
                if record["step"] < step:
                    kept.append(record)
        write_jsonl(self.path, kept)

    def close(self) -> None:
        if self.trackers:
            self.accelerator.end_training()


WARMUP_STEPS = 5  # optimizer steps left out of a stage's throughput (see Throughput)


def warmup_steps(n_steps: int, warmup: int = WARMUP_STEPS) -> int:
    """How many of a run's `n_steps` optimizer steps are warm-up: `warmup`, or fewer in a short run (at most
    half of its steps, so that a run of 1 step is timed whole and a run of 6 keeps 3 timed steps)."""
    return max(0, min(warmup, n_steps // 2))


class Throughput:
    """Training speed and memory of a stage run, in its metrics:

    - `throughput` (tokens/s: non-pad input tokens, all processes) and `examples_per_s`: the steady rate, over
      the optimizer steps after the first `warmup_steps_excluded` ones (WARMUP_STEPS, fewer in a short run:
      `warmup_steps`). The first steps pay for CUDA context and kernel autotuning, the allocator's growth and
      lazy initialisation, and would make a 40-step run look slower than a long one. `steps_timed` steps in
      `steady_seconds`;
    - `train_seconds`: the whole loop, warm-up included, and `throughput_incl_warmup` the rate over it;
    - `peak_gpu_mem_gb` (GiB) on CUDA: torch.cuda.max_memory_allocated over the whole loop (warm-up included),
      the max over processes.
    - what makes steps uneven (this process): `step_seconds` (median and max of the timed steps, how many
      took over twice the median, and for those their micro-batch shapes and whether that shape was new), the CUDA caching allocator's `alloc_retries` (a cudaMalloc that failed and
      was retried after freeing every cached block: a stall of the whole GPU) and `gc_collections` (Python's
      full, generation-2 garbage collections) during the loop.

    The stage calls `add` once per optimizer step, after the step's forward/backward: a step's time is the
    time from the previous step's `add` to its own (the previous optimizer update, this step's batches, its
    forward and backward)."""

    def __init__(self, accelerator, warmup_steps: int = WARMUP_STEPS):
        self.accelerator = accelerator
        self.warmup = warmup_steps
        self.step_tokens: list[int] = []
        self.step_examples: list[int] = []
        self.step_ends: list[float] = []  # perf_counter when each step's forward/backward was done
        self.step_shapes: list[list[list[int]]] = []  # each step's micro-batch shapes [rows, T]
        self.cuda = torch.cuda.is_available()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        self.retries0 = torch.cuda.memory_stats().get("num_alloc_retries", 0) if self.cuda else 0
        self.gc0 = gc.get_stats()[2]["collections"]
        self.t0 = time.perf_counter()

    def add(self, micro_batches: list[dict], pad_id: int, examples: int) -> None:
        """This process's micro-batches of one optimizer step (the pad token is a dedicated one: never content)."""
        self.step_tokens.append(sum(int((mb["input_ids"] != pad_id).sum()) for mb in micro_batches))
        self.step_shapes.append([list(mb["input_ids"].shape) for mb in micro_batches])
        self.step_examples.append(examples)
        if self.cuda:  # the step ends when its kernels are done, not when they are queued
            torch.cuda.synchronize()
        self.step_ends.append(time.perf_counter())

    def metrics(self) -> dict:
        """Collective (every process calls it)."""
        acc = self.accelerator
        seconds = time.perf_counter() - self.t0
        n = len(self.step_tokens)
        w = warmup_steps(n, self.warmup)
        steady = self.step_ends[-1] - (self.step_ends[w - 1] if w else self.t0) if n else 0.0
        counts = torch.tensor([sum(self.step_tokens[w:]), sum(self.step_examples[w:]), sum(self.step_tokens)],
                              dtype=torch.float64, device=acc.device)
        times = torch.tensor([steady, seconds], dtype=torch.float64, device=acc.device)
        if acc.num_processes > 1:
            counts = acc.reduce(counts, "sum")
            times = acc.reduce(times, "max")  # the slowest process sets the pace
        steady, seconds = times.tolist()
        out = {"train_seconds": round(seconds, 2),
               "throughput": round(counts[0].item() / max(steady, 1e-9), 1), "throughput_unit": "tokens/s",
               "examples_per_s": round(counts[1].item() / max(steady, 1e-9), 2),
               "warmup_steps_excluded": w, "steps_timed": n - w, "steady_seconds": round(steady, 3),
               "throughput_incl_warmup": round(counts[2].item() / max(seconds, 1e-9), 1)}
        ends = [self.t0] + self.step_ends
        durations = [b - a for a, b in zip(ends, ends[1:])]  # each step's, warm-up included
        timed = sorted(durations[w:])  # the steady steps'
        if timed:
            median = timed[len(timed) // 2]
            seen, slow = set(), []
            for i, (d, shapes) in enumerate(zip(durations, self.step_shapes)):
                key = str(shapes)
                if i >= w and d > 2 * median:  # a slow step: was its shape new (a kernel choice, a recompile)?
                    slow.append({"step": i, "seconds": round(d, 3), "shapes": shapes, "new_shape": key not in seen})
                seen.add(key)
            out["step_seconds"] = {"median": round(median, 4), "max": round(timed[-1], 4),
                                   "over_2x_median": len(slow), "slow_steps": slow[:10]}
        out["gc_collections"] = gc.get_stats()[2]["collections"] - self.gc0
        if self.cuda:
            out["alloc_retries"] = torch.cuda.memory_stats().get("num_alloc_retries", 0) - self.retries0
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


class _LogBar(tqdm):
    """Off a terminal, a postfix (the loss) waits for the next timed refresh instead of forcing one: tqdm's
    set_postfix redraws at once, which would print a line per step again."""

    def set_postfix(self, ordered_dict=None, refresh=True, **kwargs):
        super().set_postfix(ordered_dict, refresh=False, **kwargs)


def progress(iterable=None, *, desc: str, disable: bool = False, **kw):
    """A progress bar on a terminal; elsewhere (`make pipeline > run.log`) a progress line every
    LOG_INTERVAL_S seconds at most, so that a run's log is lines, not megabytes of bars."""
    if sys.stderr.isatty():
        return tqdm(iterable, desc=desc, disable=disable, **kw)
    return _LogBar(iterable, desc=desc, disable=disable, file=_Lines(sys.stderr), mininterval=LOG_INTERVAL_S, ncols=100, **kw)


def quiet_library_bars() -> None:
    """Off a terminal, the libraries' own tqdm bars (transformers, vLLM) refresh every LOG_INTERVAL_S too
    (tqdm reads TQDM_* environment variables); subprocesses inherit it."""
    if not sys.stderr.isatty():
        os.environ.setdefault("TQDM_MININTERVAL", str(LOG_INTERVAL_S))

