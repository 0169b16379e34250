"""Fail-safe training runs (issue 15): a NaN/Inf loss or gradient norm stops a training stage with one line and
exit code 3 before anything is saved (or, with `nan_policy: skip_step`, skips that update); SIGTERM ends the
current step, checkpoints and exits 143 (SIGINT: 130), and the same command resumes to bit-identical weights
with a log that holds each step once.

Tiny models, a few steps each. The subprocess runs are `python -m pipeline.run --stage sft` on a base model
folder and data files of the test's own, so no prepare stage runs."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alignment import dpo, sft
from core.checkpoints import NonFiniteError
from core.config import ModelConfig, load_recipe
from data import default_task
from data.io import write_jsonl
from data.tiny import make_model
from pipeline import run as pipeline_run

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # two runs side by side on a 2-core machine: no oversubscription
TINY = ModelConfig(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128)


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_fmt):
    """A tiny base model folder (with tokenizer) and its SFT, preference and eval-prompt files."""
    root = tmp_path_factory.mktemp("failsafe")
    make_model(tiny_fmt, root / "base", TINY)
    sets = default_task.generate(seed=1, n_sft=24, n_preference=24, n_eval_preference=0, n_eval_prompts=2,
                                 n_sampling_prompts=0)
    for name in ("sft", "preference", "eval_prompts"):
        write_jsonl(root / f"{name}.jsonl", sets[name])
    return root


def sft_command(files: Path, out: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.run", str(ROOT / "recipes" / "default.yaml"), "--stage", "sft",
            f"output_dir={out}", f"model.name_or_path={files / 'base'}", f"task.sft_data={files / 'sft.jsonl'}",
            f"task.eval_prompts_data={files / 'eval_prompts.jsonl'}", "sft.report_to=none", "sft.batch_size=4",
            "sft.warmup_ratio=0", "sft.log_every=1", "eval.max_new_tokens=4", "eval.samples_per_prompt=1", *overrides]


def log_steps(stage_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (stage_dir / "train_log.jsonl").read_text().splitlines()]


# -- NaN / Inf ------------------------------------------------------------------------------------------------
def test_diverging_sft_exits_3_with_one_line_and_writes_nothing(files, tmp_path, capsys):
    """pipeline.run's main in-process (the SIGTERM test below runs it as a command)."""
    code = pipeline_run.main(sft_command(files, tmp_path, "sft.lr=1e4", "sft.max_steps=6", "sft.save_every=1")[3:])
    err = capsys.readouterr().err
    assert code == 3, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: sft: step "), err
    assert "non-finite" in errors[0] and "(nan_policy: stop)" in errors[0] and "no model written" in errors[0]
    stage = tmp_path / "default" / "sft"
    assert not (stage / "model").exists() and not (stage / "manifest.json").exists()
    step = int(errors[0].split("step ")[1].split(":")[0])
    assert step >= 1  # step 0's loss is the untrained model's
    # the checkpoint after the last good step is kept, and named
    assert errors[0].endswith(f"last good checkpoint kept: {stage / 'checkpoints' / f'step-{step}'}")
    assert (stage / "checkpoints" / f"step-{step}" / "checkpoint.json").exists()


def test_diverging_dpo_raises_naming_the_step(files, tmp_path):
    recipe = load_recipe(None, ["dpo.lr=1e4", "dpo.max_steps=6", "dpo.batch_size=4", "dpo.warmup_ratio=0",
                                "dpo.report_to=none", "dpo.max_length=128"])
    out = tmp_path / "dpo"
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(NonFiniteError, match=r"^dpo: step [1-5]: non-finite (loss|grad norm) (nan|inf|-inf) "
                                             r"\(nan_policy: stop\); no model written, no checkpoint yet$"):
        dpo.main(recipe, out, {"model": files / "base", "data": files / "preference.jsonl"})
    assert not (out / "model").exists()
    assert signal.getsignal(signal.SIGTERM) is handler  # the stage's handler is gone with it


def sft_with_nan_losses(monkeypatch, files, out, bad_steps: set[int], *overrides: str) -> dict:
    """sft.main whose loss is NaN at `bad_steps` (the gradients stay finite: the loss alone is caught)."""
    real, calls = sft.sft_step, []

    def step(*a, **k):
        loss, n = real(*a, **k)
        calls.append(loss)
        return (math.nan if len(calls) - 1 in bad_steps else loss), n

    monkeypatch.setattr(sft, "sft_step", step)
    recipe = load_recipe(None, ["sft.lr=1e-3", "sft.max_steps=6", "sft.batch_size=4", "sft.log_every=1",
                                "sft.report_to=none", "sft.nan_policy=skip_step", *overrides])
    return sft.main(recipe, out, {"model": files / "base", "data": files / "sft.jsonl"})


def test_skip_step_skips_one_bad_update(files, tmp_path, monkeypatch):
    metrics = sft_with_nan_losses(monkeypatch, files, tmp_path / "out", {2})
    assert metrics["skipped_steps"] == 1 and math.isfinite(metrics["final_loss"])
    assert log_steps(tmp_path / "out") == [0, 1, 3, 4, 5]  # the bad step is not in the curve
    assert (tmp_path / "out" / "model" / "model.safetensors").exists()


def test_skip_step_stops_after_max_bad_steps_in_a_row(files, tmp_path, monkeypatch):
    with pytest.raises(NonFiniteError, match=r"^sft: step 3: non-finite loss nan \(nan_policy: skip_step, 3 bad steps in a row\)"):
        sft_with_nan_losses(monkeypatch, files, tmp_path / "out", {1, 2, 3, 4, 5})
    assert not (tmp_path / "out" / "model").exists()


# -- SIGTERM and resume -----------------------------------------------------------------------------------------
N_STEPS = 12  # the signal comes after step 0's log line: the run must still be training then


def test_sigterm_checkpoints_exits_143_and_resumes_bit_identically(files, tmp_path):
    steps = ["sft.lr=1e-3", f"sft.max_steps={N_STEPS}"]  # save_every 0: only the signal writes a checkpoint
    full = subprocess.Popen(sft_command(files, tmp_path / "full", *steps), cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    cut_dir = tmp_path / "cut" / "default" / "sft"
    cut = subprocess.Popen(sft_command(files, tmp_path / "cut", *steps), cwd=ROOT, env=ENV,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not ((cut_dir / "train_log.jsonl").exists() and (cut_dir / "train_log.jsonl").read_text()):
        assert cut.poll() is None and time.time() < deadline, cut.communicate()
        time.sleep(0.005)
    cut.send_signal(signal.SIGTERM)
    _, err = cut.communicate(timeout=120)
    assert cut.returncode == 143, err[-3000:]
    assert "Traceback" not in err
    (line,) = [l for l in err.splitlines() if l.startswith("interrupted")]
    done = int(line.split("at step ")[1].split(":")[0])
    assert 1 <= done < N_STEPS and line.endswith("rerun the same command to resume")
    assert (cut_dir / "checkpoints" / f"step-{done}" / "checkpoint.json").exists()
    assert not (cut_dir / "model").exists() and not (cut_dir / "manifest.json").exists()

    again = subprocess.run(sft_command(files, tmp_path / "cut", *steps), cwd=ROOT, env=ENV, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {cut_dir / 'checkpoints' / f'step-{done}'}" in again.stdout
    _, full_err = full.communicate(timeout=300)
    assert full.returncode == 0, full_err[-3000:]

    full_dir = tmp_path / "full" / "default" / "sft"
    a, b = load_file(full_dir / "model" / "model.safetensors"), load_file(cut_dir / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert log_steps(cut_dir) == log_steps(full_dir) == list(range(N_STEPS))  # no step twice
    metrics = [json.loads((d / "metrics.json").read_text()) for d in (full_dir, cut_dir)]
    assert metrics[1]["first_loss"] == metrics[0]["first_loss"] and metrics[1]["final_loss"] == metrics[0]["final_loss"]
    assert not (cut_dir / "checkpoints").exists()  # the model is saved: its checkpoints are done with


def test_sigint_in_process_checkpoints_and_exits_130(files, tmp_path, monkeypatch, capsys):
    """Ctrl-C during step 1: that step ends, its checkpoint is written, SystemExit(130); the handlers go back."""
    real, calls = sft.sft_step, []

    def step(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # handled between bytecodes: here, mid-step
        return real(*a, **k)

    monkeypatch.setattr(sft, "sft_step", step)
    handler = signal.getsignal(signal.SIGINT)
    recipe = load_recipe(None, ["sft.max_steps=6", "sft.batch_size=4", "sft.report_to=none"])
    with pytest.raises(SystemExit) as exit_:
        sft.main(recipe, tmp_path / "out", {"model": files / "base", "data": files / "sft.jsonl"})
    assert exit_.value.code == 130 and len(calls) == 2
    ckpt = tmp_path / "out" / "checkpoints" / "step-2"
    assert json.loads((ckpt / "checkpoint.json").read_text())["skipped_steps"] == 0
    assert f"interrupted (SIGINT) at step 2: checkpoint saved to {ckpt}" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is handler and not (tmp_path / "out" / "model").exists()


def test_resumed_log_keeps_the_steps_before_the_checkpoint(tmp_path):
    from types import SimpleNamespace

    from core.tracking import TrainLog

    log = TrainLog(tmp_path, SimpleNamespace(is_main_process=True), "none", {})
    for step in range(5):
        log.log(step, {"train/loss": 1.0})
    with open(log.path, "a") as f:
        f.write('{"step": 5, "train/lo')  # torn by the kill
    log.truncate(3)
    assert log_steps(tmp_path) == [0, 1, 2]
