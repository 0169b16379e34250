"""The pipeline end to end: stages chained through files, skipped when up to date, rerun on change.

The fast test runs every stage on a shrunken default task (seconds of training: it checks the plumbing,
not the figures). The slow test runs the real default recipe and checks the figures the issues promise."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "task.n_sft=64", "task.n_preference=64", "task.n_eval_preference=24", "task.n_eval_prompts=12",
    "task.n_sampling_prompts=8", "model.pretrain_steps=5", "sft.max_steps=3", "reward.max_steps=3",
    "dpo.max_steps=3", "sampling.k=3", "sampling.max_tokens=12", "eval.max_new_tokens=12", "eval.samples_per_prompt=1",
    "sft.report_to=none", "reward.report_to=none", "dpo.report_to=none",
    # 3 SFT steps leave a model that never stops, so its candidates are all truncated and give no pairs:
    # the smoke run trains DPO on the task's preference data (the slow test uses the sampled pairs).
    "dpo.data=preference",
]


def run(out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "alignment.pipeline", "recipes/default.yaml", f"output_dir={out}", *SMALL, *extra]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


@pytest.mark.vllm
def test_pipeline_runs_skips_and_reruns(tmp_path):
    first = run(tmp_path)
    base = tmp_path / "default"
    for stage in ("prepare", "sft", "reward", "sample", "dpo"):
        m = json.loads((base / stage / "manifest.json").read_text())
        assert m["complete"] and m["template_hash"], stage
    report = json.loads((base / "report" / "metrics.json").read_text())
    assert {"prepare", "sft", "reward", "sampling", "dpo"} <= set(report["stages"])
    assert "report: " in first.stdout

    again = run(tmp_path)  # nothing changed: every stage is skipped
    assert again.stdout.count("up to date") == 5, again.stdout

    changed = run(tmp_path, "dpo.beta=0.2")  # only DPO's config changed
    assert "[dpo] running" in changed.stdout and "[sft] up to date" in changed.stdout


@pytest.mark.slow
def test_default_recipe_figures(tmp_path):
    """make pipeline on the default recipe: the figures the issues ask for."""
    run_all = subprocess.run([sys.executable, "-m", "alignment.pipeline", "recipes/default.yaml", f"output_dir={tmp_path}"],
                             cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert run_all.returncode == 0, run_all.stderr[-3000:]
    s = json.loads((tmp_path / "default" / "report" / "metrics.json").read_text())["stages"]
    assert s["sft"]["gold_score"] > s["prepare"]["gold_score"] + 0.2
    assert s["sft"]["gold_score"] < 0.9
    assert s["reward"]["rm_accuracy"] >= 0.85
    assert s["sampling"]["best_of_k_gold_score"] > s["sampling"]["random_of_k_gold_score"] + 0.1
    assert s["dpo"]["gold_score"] >= s["sft"]["gold_score"] + 0.10
