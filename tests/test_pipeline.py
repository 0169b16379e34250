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
    "task.n_sampling_prompts=8", "model.pretrain_steps=5", "reward.max_steps=3",
    "dpo.max_steps=3", "sampling.k=3", "sampling.max_tokens=12", "eval.max_new_tokens=12", "eval.samples_per_prompt=1",
    "sft.report_to=none", "reward.report_to=none", "dpo.report_to=none",
    # 20 quick SFT steps teach the tiny model to stop (stop rate ~0.8), so round 2 has best-of-K answers to
    # fine-tune on; DPO trains on the task's preference data, which never runs out of pairs (the slow test
    # uses the sampled pairs).
    "sft.max_steps=20", "sft.lr=1e-2", "sft.batch_size=8", "dpo.data=preference",
]


def run(out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pipeline.run", "recipes/default.yaml", f"output_dir={out}", *SMALL, *extra]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


ROUND1 = ("prepare", "sft", "reward", "sample", "dpo")
ROUND2 = ("round2/reward", "round2/sample", "round2/sft", "round2/dpo")


def manifest(base: Path, stage: str) -> dict:
    return json.loads((base / stage / "manifest.json").read_text())


@pytest.mark.vllm
def test_pipeline_two_rounds_skips_and_reruns(tmp_path):
    first = run(tmp_path, "rounds=2")
    base = tmp_path / "default"
    for stage in ROUND1 + ROUND2 + ("report",):
        assert manifest(base, stage)["complete"], stage
    for stage in ROUND1 + ROUND2:
        assert manifest(base, stage)["template_hash"], stage
    # round 2 starts from round 1's DPO policy, samples with it under another seed, fine-tunes it on its own
    # best-of-K answers, and runs DPO from that SFT model on its own pairs
    r2 = {s: manifest(base, f"round2/{s}") for s in ("reward", "sample", "sft", "dpo")}
    dpo1 = str(base / "dpo" / "model")
    assert r2["reward"]["inputs"]["model"] == dpo1 and r2["sample"]["inputs"]["policy"] == dpo1
    assert r2["sample"]["inputs"]["reward"] == str(base / "round2" / "reward" / "model")
    assert r2["sft"]["inputs"] == {"model": dpo1, "data": str(base / "round2" / "sample" / "best_of_k.jsonl"),
                                   "eval_prompts": str(base / "prepare" / "data" / "eval_prompts.jsonl")}
    assert r2["dpo"]["inputs"]["model"] == str(base / "round2" / "sft" / "model")
    assert r2["sample"]["config"]["sampling"]["seed"] == manifest(base, "sample")["config"]["sampling"]["seed"] + 1000

    report = json.loads((base / "report" / "metrics.json").read_text())
    assert report["schema"] == 1 and [r["round"] for r in report["rounds"]] == [1, 2]
    assert set(report["rounds"][0]["stages"]) == set(report["rounds"][1]["stages"]) == {"sft", "reward", "sampling", "dpo"}
    assert report["stages"]["dpo"]["dir"] == "round2/dpo" and report["stages"]["prepare"]["dir"] == "prepare"
    assert report["rounds"][0]["stages"]["sft"]["dir"] == "sft"
    for stage in ("sft", "dpo"):  # judged against round 1's SFT policy by the last reward model
        figs = report["stages"][stage]
        for key in ("gold_score", "win_rate_vs_sft_rm", "win_rate_vs_sft_gold", "kl_to_sft", "mean_reward", "mean_length"):
            assert isinstance(figs[key], float), (stage, key)
        if stage == "dpo":  # the gold win rate, recounted by hand from both policies' judged answers
            gold = lambda d: {(r["id"], r["sample"]): r["gold"] for r in map(json.loads, (base / d / "eval_responses.jsonl").open())}  # noqa: E731
            mine, theirs = gold("round2/dpo"), gold("sft")
            wins = [1.0 if mine[k] > theirs[k] else 0.5 if mine[k] == theirs[k] else 0.0 for k in mine if k in theirs]
            assert figs["win_rate_vs_sft_gold"] == round(sum(wins) / len(wins), 4)
    assert isinstance(report["stages"]["dpo"]["kl_to_reference"], float)
    assert "win_rate_vs_sft_rm" not in report["rounds"][0]["stages"]["sft"]  # the SFT policy itself
    assert "reward_length_corr" in report["stages"]["sampling"]
    assert "report: " in first.stdout and "round 2:" in first.stdout

    again = run(tmp_path, "rounds=2")  # nothing changed: every stage is skipped
    assert again.stdout.count("up to date") == 10, again.stdout

    one = run(tmp_path)  # rounds=1: round 1 is the same work, only the report is redone
    assert one.stdout.count("up to date") == 5 and "[eval] running" in one.stdout, one.stdout
    assert [r["round"] for r in json.loads((base / "report" / "metrics.json").read_text())["rounds"]] == [1]

    changed = run(tmp_path, "rounds=2", "dpo.beta=0.2")  # DPO's config: both DPO stages and what follows round 1's
    assert "[sft] up to date" in changed.stdout and "[reward] up to date" in changed.stdout
    assert "[dpo] running" in changed.stdout and "[round 2 reward] running" in changed.stdout
    assert "[round 2 dpo] running" in changed.stdout


def test_stage_of_a_missing_round_is_one_line(tmp_path):
    res = subprocess.run([sys.executable, "-m", "pipeline.run", "recipes/default.yaml", "--stage", "dpo", "--round", "3",
                          "rounds=2", f"output_dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().count("\n") == 0 and "round 3 has no dpo stage" in res.stderr
    res = subprocess.run([sys.executable, "-m", "pipeline.run", "recipes/default.yaml", "--stage", "sft",
                          f"output_dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 2 and "missing input" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.slow
def test_default_recipe_figures(tmp_path):
    """make pipeline rounds=2 on the default recipe: the figures the issues ask for."""
    run_all = subprocess.run([sys.executable, "-m", "pipeline.run", "recipes/default.yaml", f"output_dir={tmp_path}",
                              "rounds=2"], cwd=ROOT, capture_output=True, text=True, timeout=3600)
    assert run_all.returncode == 0, run_all.stderr[-3000:]
    report = json.loads((tmp_path / "default" / "report" / "metrics.json").read_text())
    s = report["rounds"][0]["stages"]
    prep = report["stages"]["prepare"]
    # SFT lifts the base well clear of it: seed 0 gives 0.03 -> 0.27 on an Intel Xeon, 0.03 -> 0.20 on an AMD EPYC
    # (other numerics, the same code); on the EPYC, seeds 0-6 gained 0.17 to 0.41
    assert s["sft"]["gold_score"] > prep["gold_score"] + 0.1
    assert s["sft"]["gold_score"] < 0.9
    assert s["reward"]["rm_accuracy"] >= 0.90  # the promise of issue 14 (0.948 on seed 0 here)
    assert s["sampling"]["best_of_k_gold_score"] > s["sampling"]["random_of_k_gold_score"] + 0.1
    assert s["dpo"]["gold_score"] >= s["sft"]["gold_score"] + 0.10
    assert s["dpo"]["win_rate_vs_sft_gold"] > 0.55 and s["dpo"]["win_rate_vs_sft_rm"] > 0.55
    assert s["dpo"]["kl_to_reference"] > 0
    r2 = report["rounds"][1]["stages"]
    assert r2["sampling"]["best_of_k_gold_score"] > r2["sampling"]["random_of_k_gold_score"] + 0.1
    assert r2["sft"]["gold_score"] > s["sft"]["gold_score"] + 0.1  # round 2 starts from the aligned policy
    assert (tmp_path / "default" / "report" / "index.html").exists()


@pytest.mark.slow
def test_default_recipe_holds_on_two_seeds(tmp_path):
    """`make seeds` on two seeds other than the README's first (issue 14): each fresh run of the default recipe
    gains >= 0.10 gold over SFT with DPO and has a reward model of held-out accuracy >= 0.90."""
    out = tmp_path / "seeds.json"
    res = subprocess.run([sys.executable, "bench/seeds.py", "--seeds", "5", "6", "--output-dir", str(tmp_path / "runs"),
                          "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=3600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["seed"] for r in rows] == [5, 6]
    for r in rows:
        assert r["dpo_minus_sft"] >= 0.10, r
        assert r["rm_accuracy"] >= 0.90, r


def test_seeds_file_name_names_the_processor():
    """The same seed gives other figures on another processor (seeds 0-4 on an AMD EPYC against the Intel Xeon
    JSONs), so a seeds JSON's default name carries the processor's maker and family: an AMD run of the same
    day writes beside the Intel one, not over it."""
    sys.path.insert(0, str(ROOT / "bench"))
    from seeds import machine_tag

    m = {"machine": "x86_64", "cores": 2}
    assert machine_tag({**m, "cpu": "Intel(R) Xeon(R) Processor"}) == "cpu-x86_64-2c-intel-xeon"
    assert machine_tag({**m, "cpu": "AMD EPYC 9654 96-Core Processor"}) == "cpu-x86_64-2c-amd-epyc"
    assert machine_tag({**m, "cpu": ""}) == "cpu-x86_64-2c"


def test_seeds_command_line_takes_overrides_after_the_seeds():
    """bench/seeds.py --seeds 5 6 dpo.lr=5e-4: the seeds, then an override for every seed (its docstring's use)."""
    sys.path.insert(0, str(ROOT / "bench"))
    from seeds import parse_args

    a = parse_args(["--seeds", "5", "6", "dpo.lr=5e-4", "--out", "x.json"])
    assert a.seeds == [5, 6] and a.overrides == ["dpo.lr=5e-4"] and a.out == "x.json"
    assert parse_args([]).seeds == [0, 1, 2, 3, 4]
    with pytest.raises(SystemExit):
        parse_args(["--seeds", "five"])
