"""Multi-process training on CPU: 2 processes (torchrun + accelerate, gloo) give the losses of 1 process
with twice the micro-batch, and write every file once (the main process), atomically.

The 2-process runs go through `tests/dist_driver.py`, which runs `pipeline.run` and logs every file
each process writes. The DeepSpeed test runs ZeRO-3 with the settings of recipes/accelerate/zero3.yaml on
DeepSpeed's CPU accelerator (accelerate itself only runs DeepSpeed on CUDA: the driver tells its state to
use gloo), so the sharded save, the ZeRO-3 model init and DPO's reference engine are exercised in CI.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml

from core.config import ModelConfig
from pipeline.run import main as pipeline_main
from data.io import write_jsonl

ROOT = Path(__file__).resolve().parents[1]
TINY = ModelConfig(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128,
                   vocab_size=512, max_position_embeddings=256)
# 4 optimizer steps of 2 micro-batches; warmup then cosine, so a scheduler stepped per process shows up
TRAIN = {"lr": 1.0e-2, "max_steps": 4, "batch_size": 2, "grad_accum": 2, "log_every": 1, "report_to": "none",
         "save_every": 2, "warmup_ratio": 0.5, "max_length": 128}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny base model, the task's data as files, and a `files` recipe over them."""
    from data import default_task
    from data.tiny import make_model, train_tokenizer

    root = tmp_path_factory.mktemp("dist")
    sets = default_task.generate(0, n_sft=64, n_preference=64, n_eval_preference=8, n_eval_prompts=4, n_sampling_prompts=4)
    fmt = train_tokenizer(default_task.corpus(sets), root / "base", TINY.vocab_size)
    make_model(fmt, root / "base", TINY, seed=0)
    for k, v in sets.items():
        write_jsonl(root / f"{k}.jsonl", v)
    recipe = {
        "name": "x", "output_dir": str(root / "runs"),
        "task": {"kind": "files", "sft_data": str(root / "sft.jsonl"), "preference_data": str(root / "preference.jsonl"),
                 "eval_preference_data": str(root / "eval_preference.jsonl"), "prompts_data": str(root / "prompts.jsonl"),
                 "eval_prompts_data": str(root / "eval_prompts.jsonl")},
        "model": {"name_or_path": str(root / "base")},
        # DPO at lr 1e-3: at 1e-2, Adam's near-sign steps on gradient entries of rounding size let 4 steps of 1 and 2
        # processes drift apart by ~1e-5 (step 3's grad norm: 5e-6 with two rows a pair, 1.1e-5 with prefix
        # sharing, whose longer rows round differently); at 1e-3 they agree to the logged digits in both layouts
        "sft": dict(TRAIN), "dpo": {**TRAIN, "data": "preference", "lr": 1.0e-3},
        "eval": {"max_new_tokens": 8, "batch_size": 4, "samples_per_prompt": 1},
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch2(root: Path, stage: str, name: str, env: dict | None = None, overrides: tuple[str, ...] = ()) -> list[dict]:
    """The stage with 2 processes (torchrun, accelerate on gloo); returns every file write of both."""
    log = root / f"writes-{name}-{stage}"
    log.mkdir()
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "WRITE_LOG": str(log), "ACCELERATE_USE_CPU": "true", **(env or {})}
    full_env = {k: v for k, v in full_env.items() if v is not None}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "tests.dist_driver", str(root / "recipe.yaml"), "--stage", stage,
           f"name={name}", *overrides]
    res = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-6000:]
    return [json.loads(line) for f in sorted(log.glob("writes-*.jsonl")) for line in f.read_text().splitlines()]


def run1(root: Path, stage: str, name: str, overrides: list[str]) -> None:
    """The stage in one process (this one), with the given overrides."""
    assert pipeline_main([str(root / "recipe.yaml"), "--stage", stage, f"name={name}", *overrides]) == 0


def train_log(root: Path, name: str, stage: str) -> list[dict]:
    return [json.loads(line) for line in (root / "runs" / name / stage / "train_log.jsonl").read_text().splitlines()]


def assert_same_curves(a: list[dict], b: list[dict], keys: tuple[str, ...]) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b] == [0, 1, 2, 3]
    for ra, rb in zip(a, b):
        for k in keys:
            assert ra[k] == pytest.approx(rb[k], rel=1e-5, abs=1e-5), (ra["step"], k, ra[k], rb[k])  # logps: sums over tokens


def assert_written_once(writes: list[dict], out: Path) -> None:
    """Every path written once; the stage's outputs and checkpoint markers by process 0 only; process 1 writes
    only its own per-rank checkpoint files (RNG state; under ZeRO its shard); no temp folder left behind."""
    counts = Counter(w["path"] for w in writes)
    assert [p for p, c in counts.items() if c > 1] == []
    rank1 = [Path(w["path"]).name for w in writes if w["rank"] == 1]
    assert rank1 and all(n == "random_states_1.pkl" or n.startswith("zero_pp_rank_1_") for n in rank1), rank1
    rank0 = {w["path"] for w in writes if w["rank"] == 0}
    for name in ("model", "metrics.json", "manifest.json"):
        assert str(out / name) in rank0, name
    assert str(out / "checkpoints" / "step-2" / "checkpoint.json") in rank0  # save_every=2 ran, marker once
    assert sorted(p.name for p in (out / "model").iterdir() if p.suffix == ".safetensors") == ["model.safetensors"]
    assert not list(out.glob("*.tmp")) and not (out / "checkpoints").exists()  # removed after the final save
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] is True


def test_sft_two_processes_equal_one_with_double_batch(setup):
    writes = launch2(setup, "sft", "two")
    run1(setup, "sft", "one", ["sft.batch_size=4"])
    two, one = train_log(setup, "two", "sft"), train_log(setup, "one", "sft")
    assert_same_curves(two, one, ("train/loss", "train/lr", "train/tokens", "train/grad_norm"))
    assert two[0]["train/lr"] != two[2]["train/lr"]  # the schedule moved: stepped once per optimizer step
    m2 = json.loads((setup / "runs/two/sft/metrics.json").read_text())
    m1 = json.loads((setup / "runs/one/sft/metrics.json").read_text())
    assert m2["final_loss"] == pytest.approx(m1["final_loss"], abs=1e-5)
    assert "gold_score" in m2  # the main process's evaluation reached metrics.json
    assert_written_once(writes, setup / "runs/two/sft")


def test_prepare_under_a_launcher_runs_on_the_main_process_only(setup):
    """A one-process stage launched with 2 processes: process 0 runs it, process 1 waits and writes nothing."""
    writes = launch2(setup, "prepare", "prep")
    assert {w["rank"] for w in writes} == {0}
    assert Counter(Path(w["path"]).name for w in writes) == {"metrics.json": 1, "manifest.json": 1}
    assert json.loads((setup / "runs/prep/prepare/manifest.json").read_text())["complete"] is True


def _sft_models(root: Path, *names: str) -> None:
    """Give runs/<name>/sft/model the same starting policy (the base model) for a DPO run, as a finished
    SFT stage (DPO refuses an SFT folder without a complete manifest)."""
    from core.runs import StageRun

    for name in names:
        dst = root / "runs" / name / "sft" / "model"
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(root / "base", dst)
        StageRun(dst.parent, "sft", {}, {}).finish({})


DPO_KEYS = ("train/loss", "train/nll", "train/rewards/margins", "train/rewards/accuracies", "train/logps/chosen", "train/lr",
            "train/grad_norm", "train/tokens")


def test_dpo_two_processes_equal_one_with_double_batch(setup):
    _sft_models(setup, "dpo2", "dpo1")
    writes = launch2(setup, "dpo", "dpo2")
    run1(setup, "dpo", "dpo1", ["dpo.batch_size=4"])
    assert_same_curves(train_log(setup, "dpo2", "dpo"), train_log(setup, "dpo1", "dpo"), DPO_KEYS)
    assert_written_once(writes, setup / "runs/dpo2/dpo")


def zero3_env() -> dict:
    """accelerate's environment for recipes/accelerate/zero3.yaml (what `accelerate launch` sets from it),
    in float32 on DeepSpeed's CPU accelerator."""
    cfg = yaml.safe_load((ROOT / "recipes/accelerate/zero3.yaml").read_text())
    ds = cfg["deepspeed_config"]
    assert cfg["distributed_type"] == "DEEPSPEED" and ds["zero_stage"] == 3
    return {"ACCELERATE_USE_CPU": None, "DEEPSPEED_ON_CPU": "1", "ACCELERATE_USE_DEEPSPEED": "true",
            "ACCELERATE_DEEPSPEED_ZERO_STAGE": str(ds["zero_stage"]),
            "ACCELERATE_DEEPSPEED_ZERO3_INIT": str(ds["zero3_init_flag"]).lower(),
            "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL": str(ds["zero3_save_16bit_model"]).lower(),
            "ACCELERATE_GRADIENT_CLIPPING": str(ds["gradient_clipping"]),
            "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": str(ds["gradient_accumulation_steps"]),
            "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": ds["offload_optimizer_device"],
            "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": ds["offload_param_device"],
            "ACCELERATE_MIXED_PRECISION": "no"}


def test_dpo_zero3_two_processes_equal_one(setup):
    """DeepSpeed ZeRO-3 (sharded policy, the reference in its own sharded inference engine, the consolidated
    model gathered and written once by the main process) gives the 1-process losses and weights."""
    pytest.importorskip("deepspeed")
    _sft_models(setup, "z3", "z1")
    writes = launch2(setup, "dpo", "z3", zero3_env())
    run1(setup, "dpo", "z1", ["dpo.batch_size=4"])
    z3, z1 = train_log(setup, "z3", "dpo"), train_log(setup, "z1", "dpo")
    assert_same_curves(z3, z1, tuple(k for k in DPO_KEYS if k != "train/grad_norm"))
    for a, b in zip(z3, z1):  # DeepSpeed's own global norm (fp32 partitions), clipped as the recipe says
        assert a["train/grad_norm"] == pytest.approx(b["train/grad_norm"], rel=1e-4)
    assert_written_once(writes, setup / "runs/z3/dpo")
    from safetensors.torch import load_file

    a = load_file(setup / "runs/z3/dpo/model/model.safetensors")
    b = load_file(setup / "runs/z1/dpo/model/model.safetensors")
    assert sorted(a) == sorted(b)
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) < 1e-3


@pytest.mark.slow
def test_dpo_lora_zero3_two_processes_equal_one(setup):
    """LoRA under ZeRO-3: the reference is the policy with its adapters disabled, and the saved model has the
    adapters merged from the gathered state dict (no dropout, so 1 and 2 processes see the same network)."""
    pytest.importorskip("deepspeed")
    _sft_models(setup, "lz3", "lz1")
    lora = ("dpo.lora.r=4", "dpo.lora.alpha=8", "dpo.lora.dropout=0")
    launch2(setup, "dpo", "lz3", zero3_env(), lora)
    run1(setup, "dpo", "lz1", ["dpo.batch_size=4", *lora])
    assert_same_curves(train_log(setup, "lz3", "dpo"), train_log(setup, "lz1", "dpo"), ("train/loss", "train/rewards/margins"))
    from safetensors.torch import load_file

    a = load_file(setup / "runs/lz3/dpo/model/model.safetensors")
    b = load_file(setup / "runs/lz1/dpo/model/model.safetensors")
    base = load_file(setup / "base" / "model.safetensors")
    assert sorted(a) == sorted(b) == sorted(base)  # plain HF keys: merged, no lora_A / base_layer
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    assert max((a[k] - base[k]).abs().max().item() for k in a) > 1e-3  # the adapters were merged in


@pytest.mark.parametrize("task", ["CAUSAL_LM", "SEQ_CLS"])
def test_lora_merge_from_state_dict_matches_peft(task, tiny_fmt):
    """core.models.merge_lora_state (what a ZeRO-3 / FSDP save uses on the gathered state dict) equals peft's
    merge_and_unload, for a policy and for a reward model (whose head is a modules_to_save copy)."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from core.config import LoraConfig
    from core.models import apply_lora, merge_lora_state

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tiny_fmt.tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=32, num_labels=1, pad_token_id=tiny_fmt.pad_id)
    model = (LlamaForCausalLM if task == "CAUSAL_LM" else LlamaForSequenceClassification)(cfg)
    peft_model = apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0), task_type=task)
    with torch.no_grad():  # LoRA B starts at 0: give the adapters (and the head copy) weights to merge
        for n, p in peft_model.named_parameters():
            if "lora_B" in n or "modules_to_save" in n:
                p.normal_(0, 0.5)
    merged = merge_lora_state(peft_model.state_dict(), peft_model)
    want = peft_model.merge_and_unload().state_dict()
    assert sorted(merged) == sorted(want)
    for k in want:
        torch.testing.assert_close(merged[k], want[k], rtol=1e-5, atol=1e-6)
