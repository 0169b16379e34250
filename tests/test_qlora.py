"""QLoRA (model.quantization: nf4) on the CPU: bitsandbytes' CPU backend quantizes, trains and dequantizes here.

A tiny Llama (2 layers, hidden 64) saved in bf16 is loaded 4-bit by SFT, DPO and the reward stage, each one or
two optimizer steps: only the adapters (and the reward model's score head) change, the packed 4-bit weights stay
bit for bit what loading gave; the saved model/ is a plain bf16 model equal to the dequantized base +
B @ A x scaling; adapter/ holds peft's files. And the refusals: nf4 without a stage's lora, nf4 with full
fine-tuning, bitsandbytes missing or without a backend for the device (the loader and the doctor).
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from core import models
from core.config import ConfigError, ModelConfig, load_recipe
from data import default_task
from data.tiny import make_model, train_tokenizer
from tests.conftest import kill_at_first_checkpoint

pytest.importorskip("bitsandbytes")  # an optional dependency (the cpu and gpu extras install it)

TINY = ModelConfig(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128,
                   vocab_size=512, max_position_embeddings=256)
LORA = ["r=4", "alpha=8", "dropout=0.0"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # LoraConfig's default


def qlora(*more: str) -> list[str]:
    """Overrides for an nf4 recipe: bf16, LoRA on every stage (the loader asks for all three)."""
    return (["model.quantization=nf4", "model.dtype=bfloat16"]
            + [f"{stage}.lora.{kv}" for stage in ("sft", "reward", "dpo") for kv in LORA] + list(more))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(fmt, a bf16 model folder, task data, data files)."""
    root = tmp_path_factory.mktemp("qlora")
    sets = default_task.generate(0, n_sft=24, n_preference=24, n_eval_preference=2, n_eval_prompts=4, n_sampling_prompts=2)
    fmt = train_tokenizer(default_task.corpus(sets), root / "fp32", TINY.vocab_size)
    make_model(fmt, root / "fp32", TINY, seed=0)
    models.load_causal_lm(root / "fp32", "bfloat16").save_pretrained(root / "model", safe_serialization=True)
    fmt.tokenizer.save_pretrained(str(root / "model"))
    files = {}
    for name in ("sft", "preference", "eval_preference", "eval_prompts"):
        files[name] = root / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps(r) + "\n" for r in sets[name]))
    return fmt, root / "model", sets, files


def packed(model) -> dict:
    """The packed 4-bit weights of `model`, as bytes (the packing stores nibbles in bf16 elements, some of them
    NaN patterns: compared bit for bit, never as numbers)."""
    return {name.removeprefix("base_model.model.").replace(".base_layer", ""): m.weight.data.view(torch.uint8).clone()
            for name, m in models.quantized_layers(model).items()}


def trained_model(monkeypatch) -> dict:
    """Keeps the peft model a stage builds (models.apply_lora's result), to look at after the stage."""
    kept = {}
    real = models.apply_lora

    def keep(*a, **k):
        kept["model"] = real(*a, **k)
        return kept["model"]

    monkeypatch.setattr(models, "apply_lora", keep)
    return kept


def check_base_unchanged(fresh, trained):
    """The quantized base is the one loading gives, bit for bit; the unquantized frozen weights too."""
    before, after = packed(fresh), packed(trained)
    assert before and before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    frozen = {n.removeprefix("base_model.model."): p for n, p in trained.named_parameters()
              if not p.requires_grad and type(p).__name__ != "Params4bit"}
    fresh_params = dict(fresh.named_parameters())
    assert frozen and all(torch.equal(p, fresh_params[n]) for n, p in frozen.items())
    assert {p.dtype for p in frozen.values()} == {torch.bfloat16}  # peft's float32 copies went back (memory)


def check_saved(out, trained, model_dir):
    """model/: a plain bf16 model, every LoRA target = dequantized base + B @ A x scaling, the rest the input
    model's own weights; adapter/: peft's adapter files."""
    import bitsandbytes.functional as bnb_f
    from safetensors.torch import load_file

    config = json.loads((out / "model" / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    saved = load_file(out / "model" / "model.safetensors")
    base = load_file(model_dir / "model.safetensors")
    assert saved.keys() == base.keys() and {v.dtype for v in saved.values()} == {torch.bfloat16}
    merged = set()
    for name, mod in trained.named_modules():
        if hasattr(mod, "lora_A") and "default" in mod.lora_A:
            layer = mod.base_layer
            w = bnb_f.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(torch.bfloat16)
            delta = (mod.lora_B["default"].weight.float() @ mod.lora_A["default"].weight.float()) * mod.scaling["default"]
            key = name.removeprefix("base_model.model.") + ".weight"
            assert torch.equal(saved[key], (w.float() + delta).to(torch.bfloat16)), key
            assert (w.float() - base[key].float()).abs().max() > 0  # really the 4-bit base, not the bf16 one
            merged.add(key)
    assert len(merged) == 2 * len(TARGETS)  # 2 layers x 7 projections
    assert all(torch.equal(saved[k], base[k]) for k in saved if k not in merged)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (out / "adapter").iterdir()}
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    assert len(adapter) == 2 * len(merged) and all(".lora_" in k for k in adapter)
    # the next stage reads it with the plain loader (no bitsandbytes on its path)
    assert models.quantized_layers(models.load_causal_lm(out / "model", "bfloat16")) == {}


def test_sft_step_trains_only_the_adapters(tiny, tmp_path, monkeypatch):
    from alignment import sft

    fmt, model_dir, _, files = tiny
    kept = trained_model(monkeypatch)
    recipe = load_recipe(None, qlora("sft.lr=1e-2", "sft.max_steps=2", "sft.batch_size=4", "sft.report_to=none",
                                     "sft.max_length=128", "sft.save_every=1", "sft.log_every=1", "eval.max_new_tokens=4",
                                     "eval.samples_per_prompt=1"))
    out = tmp_path / "sft"
    metrics = sft.main(recipe, out, {"model": model_dir, "data": files["sft"], "eval_prompts": files["eval_prompts"]})
    assert metrics["steps"] == 2 and math.isfinite(metrics["final_loss"])
    assert metrics["n_responses"] == 4  # the stage's own evaluation: the saved policy, loaded 4-bit again
    trained = kept["model"]
    assert getattr(trained.get_base_model().model, "gradient_checkpointing", False)  # on by default with nf4
    assert {p.dtype for p in trained.parameters() if p.requires_grad} == {torch.float32}  # the adapters' masters
    assert all(n.count("lora_") for n, p in trained.named_parameters() if p.requires_grad)
    assert any(p.abs().sum() > 0 for n, p in trained.named_parameters() if "lora_B" in n)  # the adapters moved
    check_base_unchanged(models.load_causal_lm(model_dir, "bfloat16", quantization="nf4"), trained)
    check_saved(out, trained, model_dir)


def test_killed_qlora_run_resumes_to_the_same_weights(tiny, tmp_path, monkeypatch):
    """A checkpoint of a 4-bit model loads back (the quant-state entries are left out of it: core.checkpoints),
    the packed base byte for byte, and the resumed run ends where an uninterrupted one does."""
    from safetensors.torch import load_file

    from alignment import sft

    fmt, model_dir, _, files = tiny
    overrides = qlora("sft.lr=1e-2", "sft.max_steps=2", "sft.batch_size=4", "sft.report_to=none", "sft.max_length=128",
                      "sft.save_every=1")
    sft.main(load_recipe(None, overrides), tmp_path / "full", {"model": model_dir, "data": files["sft"]})
    kill_at_first_checkpoint(monkeypatch, sft, lambda: sft.main(load_recipe(None, overrides), tmp_path / "killed",
                                                                  {"model": model_dir, "data": files["sft"]}))
    kept = trained_model(monkeypatch)
    sft.main(load_recipe(None, overrides), tmp_path / "killed", {"model": model_dir, "data": files["sft"]})
    check_base_unchanged(models.load_causal_lm(model_dir, "bfloat16", quantization="nf4"), kept["model"])
    a, b = (load_file(tmp_path / run / "model" / "model.safetensors") for run in ("full", "killed"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_dpo_step_reference_is_the_quantized_base(tiny, tmp_path, monkeypatch):
    """Step 0's DPO term is ln 2: the reference log-probs (precomputed, adapters disabled) are the 4-bit policy's
    own at init, not a second copy's."""
    from alignment import dpo

    fmt, model_dir, _, files = tiny
    kept = trained_model(monkeypatch)
    monkeypatch.setattr(dpo, "load_reference", lambda *a, **k: pytest.fail("a second model loaded as the reference"))
    recipe = load_recipe(None, qlora("dpo.lr=1e-2", "dpo.max_steps=2", "dpo.batch_size=6", "dpo.log_every=1",
                                     "dpo.report_to=none", "dpo.max_length=128"))
    out = tmp_path / "dpo"
    dpo.main(recipe, out, {"model": model_dir, "data": files["preference"]})
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert abs(log[0]["train/dpo"] - math.log(2)) < 1e-5 and log[1]["train/dpo"] != log[0]["train/dpo"]
    trained = kept["model"]
    check_base_unchanged(models.load_causal_lm(model_dir, "bfloat16", quantization="nf4"), trained)
    check_saved(out, trained, model_dir)


def test_reward_model_nf4_body_full_precision_head(tiny, tmp_path, monkeypatch):
    """nf4 body + LoRA, the score head outside the quantization, trained in float32 (peft modules_to_save),
    one-row packing; the saved reward model loads for scoring."""
    from reward import train
    from reward.model import load_reward_model

    fmt, model_dir, _, files = tiny
    kept = {}
    real = train.apply_lora
    monkeypatch.setattr(train, "apply_lora", lambda *a, **k: kept.setdefault("model", real(*a, **k)))
    recipe = load_recipe(None, qlora("reward.lr=1e-2", "reward.max_steps=2", "reward.batch_size=4",
                                     "reward.report_to=none", "reward.max_length=128"))
    assert recipe.reward.one_row
    out = tmp_path / "reward"
    metrics = train.main(recipe, out, {"model": model_dir, "data": files["preference"], "eval_data": files["eval_preference"]})
    assert metrics["new_head"] and math.isfinite(metrics["final_loss"])
    assert metrics["eval_pairs"] > 0  # the stage's own evaluation: the saved reward model, loaded 4-bit again
    trained = kept["model"]
    heads = {n: p for n, p in trained.named_parameters() if "score" in n and p.requires_grad}
    assert heads and {p.dtype for p in heads.values()} == {torch.float32}
    assert all(type(m).__name__ == "Linear" for n, m in trained.named_modules() if n.endswith("score.original_module"))
    assert len(models.quantized_layers(trained)) == 2 * 7
    saved = load_reward_model(out / "model", "bfloat16")
    assert not models.quantized_layers(saved)
    head = next(p for n, p in heads.items() if "modules_to_save" in n)
    assert torch.equal(saved.score.weight, head.detach().to(torch.bfloat16))  # the trained head, saved
    # the sampling stage scores with it as the stage evaluated it: 4-bit again under nf4 (a 70B fits beside vLLM)
    from sampling.engine import load_scorer, score_candidates

    spec = {"reward": str(out / "model"), "reward_dtype": "bfloat16", "cpu": True}
    scorer = load_scorer({**spec, "reward_quantization": "nf4"})
    assert len(models.quantized_layers(scorer)) == 2 * 7 and not models.quantized_layers(load_scorer(spec))
    prompts = [[{"role": "user", "content": "hi"}]] * 2
    completions = [fmt.text_ids("hello") + [fmt.eot_id], fmt.text_ids("bye") + [fmt.eot_id]]
    got = score_candidates(scorer, fmt, prompts, completions, batch_size=2)
    assert got == score_candidates(load_reward_model(out / "model", "bfloat16", quantization="nf4"), fmt, prompts,
                                   completions, batch_size=2)  # the reward stage's own evaluation's load
    assert all(math.isfinite(r) for r in got)


# -- the loader's refusals ----------------------------------------------------------------------------------
def test_nf4_without_a_stage_lora_is_one_line():
    with pytest.raises(ConfigError) as e:
        load_recipe(None, qlora("reward.lora=null"))
    assert "'model.quantization: nf4' needs 'reward.lora'" in str(e.value) and "\n" not in str(e.value)


def test_nf4_with_full_fine_tuning_is_one_line():
    with pytest.raises(ConfigError) as e:
        load_recipe("recipes/llama-3.1-8b-instruct-full.yaml", ["model.quantization=nf4"])
    assert "nf4' with full fine-tuning" in str(e.value) and "sft.lora" in str(e.value) and "\n" not in str(e.value)


def test_without_bitsandbytes_nf4_is_refused_and_the_doctor_says_so(tiny, monkeypatch):
    from data import doctor

    doctor.nf4_problem.cache_clear()
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` raises ImportError
    try:
        with pytest.raises(ConfigError, match=r"'model.quantization: nf4': bitsandbytes is not installed"):
            load_recipe(None, qlora())
        load_recipe(None, [])  # none: bitsandbytes is never asked for
        found, _ = doctor.diagnose(tiny[1], doctor.Settings(quantization="nf4"))
        assert [f.code for f in found if f.severity == doctor.ERROR] == ["quantization"]
        assert not [f for f in doctor.diagnose(tiny[1], doctor.Settings())[0] if f.code == "quantization"]
    finally:
        doctor.nf4_problem.cache_clear()


def test_no_backend_for_the_device_is_named():
    """bitsandbytes loads its native library for the device torch sees: this CPU host has no CUDA one."""
    from data.doctor import nf4_problem

    assert nf4_problem() is None  # the CPU backend runs here
    if not torch.cuda.is_available():
        assert nf4_problem("cuda").startswith("bitsandbytes ") and "no CUDA backend" in nf4_problem("cuda")


# -- FSDP2 (the 70B recipe's launcher) --------------------------------------------------------------------------
def test_fsdp2_shards_the_4bit_weights(tiny, tmp_path):
    """2 CPU processes (gloo), the nf4 + LoRA model sharded per decoder layer with fully_shard and bf16 mixed
    precision, as accelerate's fsdp2 launcher does: each process holds half of every packed 4-bit weight (bf16
    storage: FSDP shards floating tensors only), both train to the same losses, and the gathered full state
    dict holds the packed weights byte for byte, which dequantized_state reads with the modules' scales."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                          "127.0.0.1", "--master_port", str(_free_port()), __file__, "--fsdp2-worker", str(tiny[1]),
                          str(tmp_path)], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["losses"] == ranks[1]["losses"] and ranks[0]["losses"][1] < ranks[0]["losses"][0]
    for r in ranks:
        assert r["shards"] and all(local * 2 == full for local, full in r["shards"])
    assert ranks[0]["packed_unchanged"] and ranks[0]["dequantized"] == 2 * len(TARGETS)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fsdp2_worker(model_dir: str, out: str) -> None:
    """One process of test_fsdp2_shards_the_4bit_weights (python tests/test_qlora.py --fsdp2-worker MODEL OUT)."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (2,))
    model = models.apply_lora(models.load_causal_lm(model_dir, "bfloat16", quantization="nf4"),
                              SimpleNamespace(r=4, alpha=8, dropout=0.0, target_modules=TARGETS))
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if p.requires_grad:  # float32 masters (fp32_master_weights), B non-zero so that the merge shows
            p.data = p.data.float()
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.05)
    before = packed(model)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)  # fsdp2.yaml: bf16
    for layer in model.get_base_model().model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    shards = [(m.weight.to_local().shape[0], m.weight.shape[0]) for m in models.quantized_layers(model).values()]
    torch.manual_seed(0)
    ids = torch.randint(0, 500, (2, 16))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(2):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(round(float(loss.detach()), 6))
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    result = {"losses": losses, "shards": shards}
    if rank == 0:
        full = {k.removeprefix("base_model.model.").replace(".base_layer", ""): v for k, v in state.items()}
        result["packed_unchanged"] = all(torch.equal(full[k + ".weight"].view(torch.uint8), v) for k, v in before.items())
        plain = models.dequantized_state(state, model)
        result["dequantized"] = sum(plain[f"{name}.weight"].shape == (m.out_features, m.in_features)
                                    for name, m in models.quantized_layers(model).items())
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(result))
    # rank 0 works on the full state dict while rank 1 is done: one rank tearing gloo down under the other
    # aborted rank 1 once in ~20 CI runs ("terminate called without an active exception") => meet first, and
    # skip the interpreter's teardown of gloo's threads once both are through
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--fsdp2-worker"]:
        _fsdp2_worker(sys.argv[2], sys.argv[3])


# -- bench/qlora.py's arithmetic ----------------------------------------------------------------------------------
def _qlora_bench():
    """bench/qlora.py as a module (bench/ is no package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("qlora_bench", Path(__file__).resolve().parents[1] / "bench" / "qlora.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules["qlora_bench"] = bench  # its dataclasses look their module up there
    spec.loader.exec_module(bench)
    return bench


def test_bench_fit_extrapolates_memory_per_layer():
    """Points on a line give the line back; 80 layers on 2 GPUs: the 1-GPU peak less half the resident memory,
    plus two whole layers and half the LM head (bench/qlora.py's module doc)."""
    bench = _qlora_bench()
    assert bench.line_fit([4, 8, 16], [6.0, 8.0, 12.0]) == {"intercept_gib": 4.0, "per_layer_gib": 0.5, "max_residual_gib": 0.0}
    assert bench.line_fit([4], [1.0]) is None
    rows = [{"stage": f"dpo_70b_{n}L", "arm": "nf4_lora", "layers": n, "peak_gib": 10 + 1.0 * n, "resident_gib": 5 + 0.5 * n,
             "held_gib": 4 + 0.4 * n} for n in (4, 8, 16)]
    shape = bench.SHAPES["llama-3.1-70b"]
    out = bench.fit_big(rows, shape, vocab=128256)
    one, two = out["extrapolated_80_layers"]["1_gpu"], out["extrapolated_80_layers"]["2_gpus_fsdp2_per_gpu"]
    assert one == {"held_gib": 36.0, "resident_gib": 45.0, "peak_gib": 90.0}
    lm_head = 128256 * 8192 * 2 / 2**30
    assert two["peak_gib"] == round(90.0 - 45.0 / 2 + 2 * 0.5 + lm_head / 2, 4)


def test_bench_ratios_compare_like_checkpointing():
    """bench/qlora.py's ratios: every arm over bf16_lora, and nf4_lora over bf16_lora_gc (both checkpointing: the
    quantization alone), which is the DPO comparison left when bf16_lora runs out of memory (an H100, batch 8)."""
    bench = _qlora_bench()
    row = lambda stage, arm, tps, peak: {"stage": stage, "arm": arm, "tokens_per_s": tps, "peak_gib": peak, "resident_gib": 1.0}  # noqa: E731
    rows = [row("sft", "bf16_lora", 100.0, 50.0), row("sft", "nf4_lora", 70.0, 10.0), row("sft", "bf16_lora_gc", 50.0, 20.0),
            {"stage": "dpo", "arm": "bf16_lora", "error": "OutOfMemoryError"}, row("dpo", "nf4_lora", 60.0, 12.0),
            row("dpo", "bf16_lora_gc", 40.0, 24.0)]
    out = bench.ratios(rows)
    assert out["sft: nf4_lora / bf16_lora"]["tokens_per_s"] == 0.7 and out["sft: nf4_lora / bf16_lora"]["peak_gib"] == 0.2
    assert out["sft: nf4_lora / bf16_lora_gc"]["tokens_per_s"] == 1.4 and out["sft: bf16_lora_gc / bf16_lora"]["peak_gib"] == 0.4
    assert set(k for k in out if k.startswith("dpo")) == {"dpo: nf4_lora / bf16_lora_gc"}
    assert out["dpo: nf4_lora / bf16_lora_gc"] == {"tokens_per_s": 1.5, "peak_gib": 0.5, "resident_gib": 1.0}
