"""Recipe config (typed, strict) and run folders (atomic writes, manifests, skip logic)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from core.config import ConfigError, load_recipe
from core.runs import CODE_DIRS, StageRun, hash_path, source
from data.io import atomic_open, write_json

ROOT = Path(__file__).resolve().parents[1]


def test_default_recipe_loads_with_types():
    r = load_recipe(ROOT / "recipes/default.yaml")
    assert r.name == "default" and r.dpo.beta == 0.1 and r.dpo.nll_weight == 0.2
    assert isinstance(r.sft.lr, float) and r.reward.margin is False and r.reward.one_row is True


def test_overrides_parse_yaml_scalars():
    r = load_recipe(ROOT / "recipes/default.yaml", ["sft.lr=1e-4", "rounds=2", "dpo.mask_special_tokens=false", "sft.lora.r=8"])
    assert r.sft.lr == 1e-4 and r.rounds == 2 and r.dpo.mask_special_tokens is False
    assert r.sft.lora.r == 8 and r.sft.lora.alpha == 32


@pytest.mark.parametrize("override,needle", [
    (["sft.lrr=1"], "unknown config key 'sft.lrr' (did you mean 'sft.lr'?)"),
    (["bogus=1"], "unknown config key 'bogus'"),
    (["sft.batch_size=abc"], "'sft.batch_size' must be int"),
    (["dpo.mask_special_tokens=3"], "'dpo.mask_special_tokens' must be bool"),
    (["sft"], "expected key=value"),
])
def test_bad_keys_and_types_are_named(override, needle):
    with pytest.raises(ConfigError) as e:
        load_recipe(ROOT / "recipes/default.yaml", override)
    assert needle in str(e.value)


# Fixed choices and ranges: one line naming the key and what it allows, when the recipe loads.
BAD_VALUES = [
    ("sft.overlong=trunc", "'sft.overlong' must be one of drop, truncate; got 'trunc'"),
    ("model.dtype=fp16", "'model.dtype' must be one of float32, bfloat16, float16; got 'fp16'"),
    ("sft.batch_size=0", "'sft.batch_size' must be >= 1, got 0"),
    ("sft.lr=-1", "'sft.lr' must be > 0, got -1.0"),
    ("sft.report_to=tensorbord", "'sft.report_to' must be one of tensorboard, none, wandb, trackio; got 'tensorbord'"),
    ("sampling.k=1", "'sampling.k' must be >= 2, got 1"),
    ("sampling.rejected=best", "'sampling.rejected' must be one of worst, random; got 'best'"),
    ("sampling.temperature=0", "'sampling.temperature' must be > 0, got 0.0"),
    ("sampling.top_p=1.5", "'sampling.top_p' must be > 0 and <= 1, got 1.5"),
    ("dpo.beta=0", "'dpo.beta' must be > 0, got 0.0"),
    ("reward.warmup_ratio=2", "'reward.warmup_ratio' must be >= 0 and <= 1, got 2.0"),
    ("task.kind=hub", "'task.kind' must be one of default, files; got 'hub'"),
    ("rounds=0", "'rounds' must be >= 1, got 0"),
    ("launch.gpus=0", "'launch.gpus' must be >= 1, got 0"),
    ("sft.lora.r=0", "'sft.lora.r' must be >= 1, got 0"),
]


@pytest.mark.parametrize("override,message", BAD_VALUES)
def test_bad_values_are_one_line_at_load_time(override, message):
    with pytest.raises(ConfigError) as e:
        load_recipe(ROOT / "recipes/default.yaml", [override])
    assert str(e.value) == f"{ROOT / 'recipes/default.yaml'}: {message}"


def test_average_last_with_lora_is_refused_at_load_time():
    with pytest.raises(ConfigError, match="'dpo.average_last' does not support LoRA"):
        load_recipe(None, ["dpo.average_last=3", "dpo.lora={}"])


@pytest.mark.parametrize("override", ["sampling.rejected=best", "sft.lr=-1"])
def test_bad_value_stops_the_pipeline_before_any_stage(tmp_path, override):
    """A wrong sampling.rejected used to fail only after SFT and the reward model had run."""
    res = subprocess.run([sys.executable, "-m", "pipeline.run", "recipes/default.yaml", f"output_dir={tmp_path}", override],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    key = override.split("=")[0]
    assert res.stderr.strip().splitlines() == [next(f"error: recipes/default.yaml: {m}" for o, m in BAD_VALUES if o == override)]
    assert key and not any(tmp_path.iterdir())  # no stage ran


def test_worker_config_goes_through_the_checked_loader():
    from core.config import SamplingConfig, section

    assert section(SamplingConfig, {"k": 4}, "sampling").k == 4
    with pytest.raises(ConfigError, match="'sampling.k' must be >= 2"):
        section(SamplingConfig, {"k": 1}, "sampling")
    with pytest.raises(ConfigError, match="unknown config key 'sampling.kk'"):
        section(SamplingConfig, {"kk": 1}, "sampling")


def test_unknown_key_in_file_names_file(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("name: x\nsft:\n  learning_rate: 1\n")
    with pytest.raises(ConfigError, match=r"r.yaml: unknown config key 'sft.learning_rate'"):
        load_recipe(p)
    p.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match=r"r.yaml: line \d+ invalid YAML"):
        load_recipe(p)


def test_cli_reports_one_line_not_traceback(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("name: x\nsft:\n  lrr: 1\n")
    res = subprocess.run([sys.executable, "-m", "pipeline.run", str(p), "--stage", "prepare"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1] == f"error: {p}: unknown config key 'sft.lrr' (did you mean 'sft.lr'?)"


def test_atomic_write_leaves_old_file_on_crash(tmp_path):
    path = tmp_path / "a.json"
    write_json(path, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_open(path) as f:
            f.write('{"v": 2, "torn')
            raise RuntimeError("killed")
    assert json.loads(path.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]  # no temp file left behind


def test_stage_skip_and_rerun_on_changed_input(tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text("a\n")
    out = tmp_path / "stage"
    run = StageRun(out, "s", {"lr": 1}, {"data": inp}, template_hash="t1")
    assert not run.is_up_to_date()
    run.finish({"x": 1})
    assert StageRun(out, "s", {"lr": 1}, {"data": inp}, template_hash="t1").is_up_to_date()
    assert not StageRun(out, "s", {"lr": 2}, {"data": inp}, template_hash="t1").is_up_to_date()  # config changed
    assert not StageRun(out, "s", {"lr": 1}, {"data": inp}, template_hash="t2").is_up_to_date()  # tokenizer changed
    h = hash_path(inp)
    inp.write_text("b\n")
    assert hash_path(inp) != h
    assert not StageRun(out, "s", {"lr": 1}, {"data": inp}, template_hash="t1").is_up_to_date()  # input changed
    m = json.loads((out / "manifest.json").read_text())
    assert m["complete"] and m["template_hash"] == "t1" and "torch" in m["packages"]
    assert m["wall_seconds"] == json.loads((out / "metrics.json").read_text())["wall_seconds"]  # one clock, both files
    assert m["code_sha256"] == source()["code_sha256"] and m["git_commit"]  # the code that made it


def test_source_digest_follows_the_code(tmp_path):
    """A manifest or bench JSON names the code that made it: the digest changes with any .py or .yaml of the
    project, not with caches; a copy without git (a GPU host's) has the digest alone, equal to the checkout's."""
    import shutil

    root = Path(__file__).resolve().parents[1]
    here = source()
    assert len(here["code_sha256"]) == 16 and len(here["git_commit"]) == 40 and isinstance(here["git_dirty"], bool)
    copy = tmp_path / "copy"
    for d in CODE_DIRS:
        shutil.copytree(root / d, copy / d, ignore=shutil.ignore_patterns("__pycache__"))
    base = source(copy)
    assert base == {"code_sha256": here["code_sha256"], "git_commit": None, "git_dirty": None}
    (copy / "core" / "__pycache__").mkdir(exist_ok=True)
    (copy / "core" / "__pycache__" / "x.py").write_text("")
    (copy / "bench" / "results" / "new.json").write_text("{}")
    assert source(copy) == base
    (copy / "recipes" / "default.yaml").write_text((copy / "recipes" / "default.yaml").read_text() + "\n")
    assert source(copy)["code_sha256"] != base["code_sha256"]


def test_stage_refuses_input_with_other_template(tmp_path):
    up = tmp_path / "up"
    write_json(up / "manifest.json", {"template_hash": "aaa"})
    run = StageRun(tmp_path / "down", "s", {}, {"data": up}, template_hash="bbb")
    with pytest.raises(ValueError, match="made with tokenizer/template aaa"):
        run.check_template(up)


def test_gpu_only_compute_options_refused_on_cpu_in_one_line():
    """attention: flex and liger are CUDA-only: a stage on the CPU refuses them with a ConfigError naming the
    key (exit 2 through pipeline.run), before any training."""
    import torch

    from core.models import speedups_problem

    recipe = load_recipe(None, ["dpo.attention=flex"])
    why = speedups_problem(recipe.dpo, torch.device("cpu"), "dpo")
    assert why.startswith("dpo.attention: flex") and "\n" not in why
    why = speedups_problem(load_recipe(None, ["sft.liger=true"]).sft, torch.device("cpu"), "sft")
    assert why.startswith("sft.liger") and "\n" not in why
    assert speedups_problem(recipe.sft, torch.device("cpu"), "sft") is None
    with pytest.raises(ConfigError, match="bf16_kahan"):
        load_recipe(None, ["model.dtype=bfloat16", "dpo.master_weights=bf16_kahan", "launch.launcher=zero3"])
    with pytest.raises(ConfigError, match=r"'reward.compile' with 'reward.liger'.*choose one"):
        load_recipe(None, ["reward.compile=true", "reward.liger=true"])


def test_greedy_eval_with_several_samples_refused_at_load():
    """eval.temperature 0 with samples_per_prompt 2 (the default recipe's) crashed in transformers' generate
    after a whole stage had trained; it is one line at load time now."""
    with pytest.raises(ConfigError, match="eval.samples_per_prompt must be 1"):
        load_recipe(ROOT / "recipes" / "default.yaml", ["eval.temperature=0"])
    assert load_recipe(ROOT / "recipes" / "default.yaml", ["eval.temperature=0", "eval.samples_per_prompt=1"]).eval.temperature == 0
