"""Every recipe and launcher config is valid without running it: schema, launcher, paths, hyperparameters.

recipes/*.yaml load through the typed config; their `launch` names a config in recipes/accelerate/ that
accelerate itself accepts, with the distributed type its name says; local paths exist and hub names are
well formed; the real-model recipes carry Llama 3's hyperparameters; the Makefile turns a recipe's launch
section into the right `accelerate launch` command.
"""

from __future__ import annotations

import json
import re
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from core.config import ConfigError, load_recipe
from data import hub

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
LAUNCHERS = sorted((ROOT / "recipes" / "accelerate").glob("*.yaml"))
REAL = [p for p in RECIPES if p.name.startswith("llama-")]
# launcher name -> (accelerate distributed_type, extra checks)
KINDS = {"single": "NO", "ddp": "MULTI_GPU", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED", "fsdp2": "FSDP"}
HUB_NAME = re.compile(r"^[\w.-]+/[\w.-]+(:[\w.-]+(\[[\d:%]*\])?)?$")


def test_the_expected_files_exist():
    assert {p.stem for p in LAUNCHERS} == set(KINDS)
    assert {p.name for p in REAL} == {"llama-3.2-1b-instruct-lora.yaml", "llama-3.2-1b-instruct-full.yaml",
                                      "llama-3.1-8b-instruct-lora.yaml", "llama-3.1-8b-instruct-full.yaml",
                                      "llama-3.1-8b-instruct-qlora.yaml", "llama-3.1-70b-instruct-qlora.yaml"}
    assert (ROOT / "recipes" / "gpu-smoke.yaml").exists()


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.stem)
def test_launcher_config_is_valid_for_accelerate(path):
    from accelerate.commands.config.config_args import ClusterConfig

    raw = yaml.safe_load(path.read_text())
    cfg = ClusterConfig.from_yaml_file(str(path))  # accelerate's own loader: unknown keys are an error
    assert cfg.distributed_type.name == KINDS[path.stem] == raw["distributed_type"]
    assert raw["mixed_precision"] == "bf16" and raw["num_machines"] == 1
    if raw["distributed_type"] == "DEEPSPEED":
        ds = raw["deepspeed_config"]
        assert ds["zero_stage"] == int(path.stem[-1])
        assert ds["gradient_accumulation_steps"] == 1  # the stages accumulate themselves
    if path.stem == "zero3":  # a consolidated 16-bit model is saved; models are created sharded
        assert raw["deepspeed_config"]["zero3_save_16bit_model"] is True
        assert raw["deepspeed_config"]["zero3_init_flag"] is True
    if path.stem == "fsdp2":
        fsdp = raw["fsdp_config"]
        assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_transformer_layer_cls_to_wrap"] == "LlamaDecoderLayer"
        assert fsdp["fsdp_state_dict_type"] in ("SHARDED_STATE_DICT", "FULL_STATE_DICT")


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_loads_and_its_paths_resolve(path):
    r = load_recipe(path)
    if r.launch.launcher:
        assert (ROOT / "recipes" / "accelerate" / f"{r.launch.launcher}.yaml").exists()
        assert (r.launch.gpus == 1) == (r.launch.launcher == "single")
        assert r.sampling.data_parallel * r.sampling.tensor_parallel <= r.launch.gpus
    for spec in [r.model.name_or_path, r.model.tokenizer] + [getattr(r.task, f) for f in hub.DATA_FIELDS]:
        if spec in (None, "tiny", "llama3"):
            continue
        if hub.is_hub(spec):
            assert HUB_NAME.match(spec), spec  # org/name[:split[slice]]
        else:
            assert (ROOT / spec).exists(), f"{path.name}: local path {spec} does not exist"
    if r.task.kind == "files":
        assert all(getattr(r.task, f) for f in hub.DATA_FIELDS), "a files task names every data set"
    # the pipeline's invariants (Llama 3): every recipe
    assert r.dpo.beta == 0.1 and r.dpo.nll_weight == 0.2
    assert r.reward.margin is False and r.reward.one_row is True
    assert r.sampling.k >= 2 and r.sampling.rejected in ("worst", "random")


@pytest.mark.parametrize("path", REAL, ids=lambda p: p.stem)
def test_real_model_recipes_use_llama3_hyperparameters(path):
    r = load_recipe(path)
    size = next(s for s in ("70b", "8b", "1b") if f"-{s}-" in path.name)
    assert r.model.name_or_path == {"70b": "meta-llama/Llama-3.1-70B-Instruct", "8b": "meta-llama/Llama-3.1-8B-Instruct",
                                    "1b": "meta-llama/Llama-3.2-1B-Instruct"}[size]
    assert r.model.dtype == "bfloat16" and r.task.kind == "files"
    # formatting masked in the DPO term (Llama 3); the chosen eot kept in the NLL term (measured, issue 14)
    assert r.dpo.mask_special_tokens is True and r.dpo.nll_mask_special_tokens is False
    assert 10 <= r.sampling.k <= 30  # Llama 3: K from 10 to 30
    qlora = path.stem.endswith("-qlora")
    lora = qlora or path.stem.endswith("-lora")
    assert r.model.quantization == ("nf4" if qlora else "none")
    for stage in (r.sft, r.reward, r.dpo):
        assert (stage.lora is not None) == lora
        assert stage.lr == (1.0e-4 if lora else 1.0e-5)  # Llama 3's 1e-5; LoRA 10x
        assert stage.max_length >= 2048 and stage.save_every > 0
    if qlora:  # one GPU, or FSDP2 (it shards the 4-bit weights; DDP would copy them)
        assert r.launch.launcher in ("single", "fsdp2")
    elif lora:
        assert r.launch.launcher in ("single", "ddp")
    else:
        assert r.launch.launcher == "zero3"
    # the global batch: 128 sequences (or pairs) per optimizer step
    assert r.sft.batch_size * r.sft.grad_accum * r.launch.gpus == 128
    assert r.dpo.batch_size * r.dpo.grad_accum * r.launch.gpus == 128
    datasets = {getattr(r.task, f).split(":")[0] for f in hub.DATA_FIELDS}
    assert datasets <= {"HuggingFaceH4/ultrafeedback_binarized", "Anthropic/hh-rlhf"}


@pytest.mark.parametrize("path", [p for p in REAL if p.stem.endswith("-lora")], ids=lambda p: p.stem)
def test_lora_recipes_use_the_measured_compute_options(path):
    """The one-GPU and DDP LoRA recipes train with the options the H200 benchmark measured (flex block masks
    over packed rows, Liger's kernels: the 8B LoRA DPO stage 2.76x TRL at 0.96x its memory), and `make
    install GPU=1` installs what `liger: true` needs. (The sharded recipes leave them off: not measured under
    ZeRO-3 or FSDP2.)"""
    r = load_recipe(path)
    for stage in (r.sft, r.reward, r.dpo):
        assert (stage.attention, stage.liger, stage.compile) == ("flex", True, False)
        assert stage.pack_tokens >= stage.max_length
    gpu_extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    assert any(dep.startswith("liger-kernel") for dep in gpu_extra)


@pytest.mark.parametrize("path", [p for p in REAL if "-1b-" in p.name], ids=lambda p: p.stem)
def test_1b_recipes_sample_with_the_measured_engines_per_gpu(path):
    """A 1B policy samples with two vLLM engines a GPU, as the newest GPU sampling benchmark that ran the recipe's
    setting measured them (the recipe cites it): an arm with the recipe's engines_per_gpu, memory share and CUDA
    graphs, faster than one engine and than plain vLLM, with one engine's candidates (each engine core
    in-process: a shard's batches, and so a GPU's numerics, depend on the shard alone); the shares leave a GPU
    room for the reward models."""
    from sampling.engine import cudagraph_batch

    r = load_recipe(path)
    assert r.sampling.engines_per_gpu == 2 and r.sampling.tensor_parallel == 1
    assert r.sampling.engines_per_gpu * r.sampling.gpu_memory_utilization <= 0.8
    mine = {f"sampling.engines_per_gpu={r.sampling.engines_per_gpu}",
            f"sampling.gpu_memory_utilization={r.sampling.gpu_memory_utilization}"}
    graphs = cudagraph_batch(r.sampling)  # 1,024: shards of 256 x K=10, at most vLLM's 1,024 at once

    def recipes_arm(result: dict) -> dict | None:  # the arm with this recipe's engines, share and graphs
        return next((a for a in result["rows"] if a.get("arm", "").startswith("stage_") and "error" not in a
                     and mine <= set(a["overrides"])
                     and a.get("cudagraph_batch", a["settings"].get("cudagraph_max_batch")) == graphs), None)

    runs = [json.loads(p.read_text()) | {"file": p.name}
            for p in sorted((ROOT / "bench" / "results").glob("sampling-speed-*-nvidia-*.json"))]
    result = [run for run in runs if recipes_arm(run)][-1]
    assert result["file"] in path.read_text()
    arm = recipes_arm(result)
    ratios = result["ratios"]
    assert ratios[f"{arm['arm']} / stage"] > 1.5 and ratios[f"{arm['arm']} / plain_vllm"] > 1.5
    assert ratios[f"{arm['arm']} same ids as stage"] and ratios[f"{arm['arm']} same rewards as stage"]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_names_its_chat_template(path):
    """Llama 3.1/3.2/3.3 models render llama3.1's template (dated system preamble, ipython, <|eom_id|>); the
    tiny recipes the 3.0 one. Named in the file, not left to the default."""
    from typing import get_args

    from core.config import ChatTemplate
    from data.chat_format import TEMPLATES

    assert get_args(ChatTemplate) == TEMPLATES
    assert "chat_template" in (yaml.safe_load(path.read_text())["model"])
    r = load_recipe(path)
    name = r.model.name_or_path
    expected = "llama3.1" if re.search(r"Llama-3\.[123]", name) else "llama3"
    assert r.model.chat_template == expected, f"{path.name}: {name} needs model.chat_template: {expected}"
    assert r.model.template_date == "26 Jul 2024" and r.model.dropout == 0.0


@pytest.mark.parametrize("path", [p for p in REAL if p.stem.endswith("-qlora")], ids=lambda p: p.stem)
def test_qlora_recipes(path):
    """nf4 with LoRA on every stage (the loader refuses anything else), a launcher that keeps the 4-bit weights
    whole: one GPU, or FSDP2 whose bf16 mixed precision equals the packed weights' bf16 storage (a cast would
    turn their bits into other numbers); the 70B's stated memory is its measured fit's."""
    r = load_recipe(path)
    assert r.model.quantization == "nf4" and r.model.dtype == "bfloat16"
    assert all(getattr(r, s).lora is not None for s in ("sft", "reward", "dpo"))
    launcher = yaml.safe_load((ROOT / "recipes" / "accelerate" / f"{r.launch.launcher}.yaml").read_text())
    assert launcher["mixed_precision"] == "bf16"
    if r.launch.launcher == "fsdp2":
        assert launcher["fsdp_config"]["fsdp_cpu_ram_efficient_loading"] is False  # each process quantizes on its GPU
        assert launcher["fsdp_config"]["fsdp_activation_checkpointing"] is False  # the stages checkpoint (nf4's default)
    if "70b" in path.name:
        assert (r.launch.launcher, r.launch.gpus) == ("fsdp2", 2)
        # the memory it states is the measured fit's (bench/qlora.py's JSON), not a hope
        fit = json.loads(sorted((ROOT / "bench" / "results").glob("qlora-*-nvidia-*.json"))[-1].read_text())["fit_70b"]
        at80 = fit["extrapolated_80_layers"]
        text = path.read_text()
        assert f"{at80['1_gpu']['peak_gib']:.1f} GiB at 80 layers on one GPU" in text
        assert f"{at80['2_gpus_fsdp2_per_gpu']['peak_gib']:.1f} GiB a GPU on two" in text
        assert f"{fit['fit']['peak_gib']['per_layer_gib']:.3f} GiB of peak memory per layer" in text
    else:
        assert (r.launch.launcher, r.launch.gpus) == ("single", 1)
    with pytest.raises(ConfigError, match="needs 'dpo.lora'"):
        load_recipe(path, ["dpo.lora=null"])


def test_gpu_smoke_is_a_llama_3_2_1b_shape():
    """hidden 2048, 16 layers, 32/8 heads, SwiGLU 8192, RoPE 500k, tied embeddings, the 128k Llama 3 vocabulary:
    1,235,814,400 parameters, as Llama-3.2-1B (counted on the meta device: nothing allocated)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    r = load_recipe(ROOT / "recipes" / "gpu-smoke.yaml")
    m = r.model
    assert (m.name_or_path, m.tokenizer, m.dtype) == ("tiny", "llama3", "bfloat16")
    assert (m.hidden_size, m.num_layers, m.num_heads, m.num_kv_heads, m.intermediate_size) == (2048, 16, 32, 8, 8192)
    assert m.rope_theta == 500000.0 and m.tie_word_embeddings is True
    assert (r.launch.launcher, r.launch.gpus) == ("single", 1)
    cfg = LlamaConfig(vocab_size=128256, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
                      num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads, num_key_value_heads=m.num_kv_heads,
                      tie_word_embeddings=m.tie_word_embeddings)
    with torch.device("meta"):
        n = sum(p.numel() for p in LlamaForCausalLM(cfg).parameters())
    assert n == 1_235_814_400
    assert r.sft.max_steps == -1 and 20 <= r.task.n_sft // r.sft.batch_size <= 100  # a few dozen steps


def test_bad_launcher_is_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match=r"launch.launcher 'zero4': no recipes/accelerate/zero4.yaml \(one of: ddp, fsdp2, single, zero2, zero3\)"):
        load_recipe(ROOT / "recipes" / "gpu-smoke.yaml", ["launch.launcher=zero4"])
    with pytest.raises(ConfigError, match="'launch.gpus' must be >= 1"):
        load_recipe(ROOT / "recipes" / "gpu-smoke.yaml", ["launch.gpus=0"])


def _make_n(*args) -> list[str]:
    res = subprocess.run(["make", "-n", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return [line for line in res.stdout.splitlines() if "pipeline.run" in line]


def test_makefile_launches_training_stages_with_the_recipe_launcher():
    (cmd,) = _make_n("sft", "RECIPE=recipes/llama-3.1-8b-instruct-full.yaml", "sft.lr=2e-5")
    assert re.search(r"accelerate launch --config_file recipes/accelerate/zero3.yaml --num_processes 8 .*-m pipeline.run "
                     r"recipes/llama-3.1-8b-instruct-full.yaml --stage sft +'sft.lr=2e-5'$", cmd), cmd  # one quoted word
    (cmd,) = _make_n("dpo", "RECIPE=recipes/gpu-smoke.yaml", "GPUS=2", "LAUNCHER=zero3")  # the command line wins
    assert "--config_file recipes/accelerate/zero3.yaml --num_processes 2 " in cmd
    (cmd,) = _make_n("sample", "RECIPE=recipes/llama-3.1-8b-instruct-full.yaml")  # vLLM spreads itself: one process
    assert "accelerate" not in cmd and cmd.split()[1:3] == ["-m", "pipeline.run"]
    (cmd,) = _make_n("sft")  # the default recipe: plain python, as before
    assert "accelerate" not in cmd
    cmds = [c for c in _make_n("pipeline", "RECIPE=recipes/llama-3.2-1b-instruct-full.yaml") if "--stage " in c]
    stages = [c.split("--stage ")[1].split()[0] for c in cmds]
    assert stages == ["prepare", "sft", "reward", "sample", "dpo", "eval"]
    assert [("accelerate launch" in c) for c in cmds] == [False, True, True, False, True, False]
    # every round, stage by stage: the schedule comes from the pipeline itself
    cmds = [c for c in _make_n("pipeline", "RECIPE=recipes/llama-3.2-1b-instruct-full.yaml", "rounds=2") if "--stage " in c]
    rounds = [(c.split("--stage ")[1].split()[0], c.split("--round ")[1].split()[0]) for c in cmds]
    assert rounds[5:] == [("reward", "2"), ("sample", "2"), ("sft", "2"), ("dpo", "2"), ("eval", "2")]
    assert all("rounds=2" in c for c in cmds)


def test_hub_inputs_are_read_from_the_prepare_folder(tmp_path, monkeypatch):
    """A recipe naming hub data and a hub model: prepare writes them under prepare/ (prompts as {id, prompt},
    a repeated prompt once), and every stage reads those local files (their hashes go into the manifests)."""
    from pipeline import run as pipeline

    rows = {"HuggingFaceH4/ultrafeedback_binarized:train_gen[:3]": [
        {"prompt_id": "a", "prompt": "Hi?", "messages": [{"role": "user", "content": "Hi?"}]},
        {"prompt_id": "a", "prompt": "Hi?"},
        {"prompt": "Bye?"}]}
    monkeypatch.setattr(hub, "iter_file", lambda spec: enumerate(rows[spec], 1))
    n = hub.fetch_dataset("HuggingFaceH4/ultrafeedback_binarized:train_gen[:3]", tmp_path / "prompts.jsonl", "prompts")
    import json

    got = [json.loads(line) for line in (tmp_path / "prompts.jsonl").read_text().splitlines()]
    assert n == 2 and [(g["id"], g["prompt"]) for g in got] == [("a", [{"role": "user", "content": "Hi?"}]),
                                                                ("train_gen[:3]-3", [{"role": "user", "content": "Bye?"}])]
    r = load_recipe(ROOT / "recipes" / "llama-3.1-8b-instruct-full.yaml", [f"output_dir={tmp_path}"])
    prep = tmp_path / r.name / "prepare"
    inputs = pipeline.stage_inputs(r, "sft")
    assert inputs["model"] == prep / "model" and inputs["data"] == prep / "data" / "sft.jsonl"
    assert pipeline.stage_inputs(r, "sample")["prompts"] == prep / "data" / "prompts.jsonl"
    local = tmp_path / "mine.jsonl"
    local.write_text("")
    r = load_recipe(ROOT / "recipes" / "llama-3.1-8b-instruct-full.yaml", [f"output_dir={tmp_path}", f"task.sft_data={local}"])
    assert pipeline.stage_inputs(r, "sft")["data"] == local  # a local file is read where it is
