"""SFT: loss normalisation under gradient accumulation, the eot label, and a smoke run on the tiny model."""

import json
import math

import pytest
import torch
from accelerate import Accelerator
from transformers import LlamaConfig, LlamaForCausalLM

from core.config import load_recipe
from core.logps import gather_logps
from tests.conftest import full_logps
from alignment.sft import sft_step
from data.chat_format import collate




CONVS = [
    [{"role": "user", "content": "Say the first word of: river stone cloud."}, {"role": "assistant", "content": "river"}],
    [{"role": "user", "content": "Copy the words: apple lemon tiger piano."}, {"role": "assistant", "content": "Sure! Here it is: apple lemon tiger piano"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say the last word of: a b c."}, {"role": "assistant", "content": "c. Hope this helps!"}],
    [{"role": "user", "content": "Copy the words: stone cloud."}, {"role": "assistant", "content": "stone"},
     {"role": "user", "content": "And again?"}, {"role": "assistant", "content": "stone cloud"}],
]


def test_masked_nll_by_hand():
    # vocab 2, uniform logits: every trained token costs ln 2.
    logits = torch.zeros(1, 4, 2)
    ids = torch.tensor([[0, 1, 0, 1]])
    mask = torch.tensor([[0, 0, 1, 1]])  # tokens 2 and 3 are labels
    (logps,) = gather_logps(logits, ids, [mask])
    assert logps.dtype == torch.float32
    assert -logps.item() == pytest.approx(2 * math.log(2))


def test_eot_label_survives_collation(tiny_fmt):
    assert tiny_fmt.pad_id not in (tiny_fmt.eot_id, tiny_fmt.eos_id)  # pad == eot would mask the eot label
    batch = [tiny_fmt.encode(c) for c in CONVS]
    b = collate(batch, tiny_fmt.pad_id, "assistant")
    for row, enc in enumerate(batch):
        n = len(enc)
        assert b["input_ids"][row, n - 1].item() == tiny_fmt.eot_id
        assert b["loss_mask"][row, n - 1].item() == 1  # the final eot is trained: the model learns to stop
        assert b["loss_mask"][row, n:].sum().item() == 0  # pad never trained
        assert (b["input_ids"][row, n:] == tiny_fmt.pad_id).all()
        assert b["attention_mask"][row].sum().item() == n


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def test_gradient_accumulation_equivalence(tiny_fmt, tiny_lm):
    """batch 4 x 1 micro-step == batch 1 x 4 micro-steps: same loss and gradients on variable-length data."""
    acc = Accelerator(cpu=True)
    enc = [tiny_fmt.encode(c) for c in CONVS]
    assert len({sum(e.assistant_mask) for e in enc}) > 1  # different numbers of trained tokens per row

    model = tiny_lm(tiny_fmt)
    big = [collate(enc, tiny_fmt.pad_id, "assistant")]
    loss_big, n_big = sft_step(model, big, acc, world_size=1)
    g_big = _grads(model)

    model.zero_grad()
    small = [collate([e], tiny_fmt.pad_id, "assistant") for e in enc]
    loss_small, n_small = sft_step(model, small, acc, world_size=1)
    g_small = _grads(model)

    assert n_big == n_small
    assert loss_big == pytest.approx(loss_small, rel=1e-5)
    for name in g_big:
        torch.testing.assert_close(g_small[name], g_big[name], rtol=1e-4, atol=1e-6)

    # Per-micro-batch normalisation (the common bug) would give a different gradient here.
    model.zero_grad()
    for mb in small:
        logits = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits
        nll = -full_logps(logits, mb["input_ids"], mb["loss_mask"]).sum()
        (nll / mb["loss_mask"][:, 1:].sum() / len(small)).backward()
    wrong = _grads(model)
    assert any(not torch.allclose(wrong[k], g_big[k], rtol=1e-3, atol=1e-6) for k in g_big)


def test_sft_smoke_every_parameter_changes(tmp_path, tiny_fmt, tiny_lm):
    """A few SFT steps on the tiny model: every trainable parameter changes and the loss falls."""
    from alignment import sft
    from data.io import write_jsonl
    from safetensors.torch import load_file

    model_dir = tmp_path / "base"
    model = tiny_lm(tiny_fmt)
    model.save_pretrained(model_dir, safe_serialization=True)
    tiny_fmt.tokenizer.save_pretrained(model_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = tmp_path / "sft.jsonl"
    from data.default_task import generate

    records = generate(seed=1, n_sft=24, n_preference=0, n_eval_preference=0, n_eval_prompts=0, n_sampling_prompts=0)["sft"]
    write_jsonl(data, records + [{"messages": [{"role": "user", "content": "no answer"}]}])
    recipe = load_recipe(None, ["sft.lr=1e-2", "sft.max_steps=12", "sft.batch_size=4", "sft.report_to=none", "sft.warmup_ratio=0"])
    metrics = sft.main(recipe, tmp_path / "out", {"model": model_dir, "data": data})
    after = load_file(tmp_path / "out" / "model" / "model.safetensors")
    unchanged = [k for k, v in before.items() if torch.equal(v, after[k])]
    assert unchanged == []
    assert metrics["final_loss"] < metrics["first_loss"]
    # the record not ending with the assistant is reported and skipped, never fatal
    assert metrics["data"]["counts"] == {"not_ending_with_assistant": 1}
    assert metrics["data"]["n_in"] == 25 and metrics["data"]["n_kept"] == 24
    log = [json.loads(l) for l in open(tmp_path / "out" / "train_log.jsonl")]
    assert log and "train/loss" in log[0]


def test_sft_bf16_recipe_trains_float32_masters_saves_bf16(tmp_path, bf16_sft_inputs):
    """A bf16 recipe: the trainable weights are float32 masters (bf16 compute by autocast), so updates of
    lr 2e-5 accumulate instead of rounding away in bf16's 8-bit mantissa; the model is saved in bf16."""
    from alignment import sft
    from safetensors.torch import load_file

    model_dir, _, before = bf16_sft_inputs(40)
    recipe = load_recipe(None, ["model.dtype=bfloat16", "sft.lr=3e-5", "sft.max_steps=10", "sft.batch_size=4",
                                "sft.report_to=none", "sft.warmup_ratio=0"])
    sft.main(recipe, tmp_path / "out", {"model": model_dir, "data": tmp_path / "sft.jsonl"})
    after = load_file(tmp_path / "out" / "model" / "model.safetensors")
    assert {v.dtype for v in after.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "out" / "model" / "config.json").read_text())["dtype"] == "bfloat16"
    # Adam moves every weight by ~lr per step: 10 x 2e-5 = 2e-4, ~1% of a 0.02 weight, ~4 bf16 half-ulps;
    # one step alone (0.1%) is below half an ulp, so bf16 weights updated in place would barely move
    w0, w1 = before["model.layers.0.mlp.up_proj.weight"].float(), after["model.layers.0.mlp.up_proj.weight"].float()
    assert (w0 != w1).float().mean() > 0.5


def test_fp32_master_weights_keeps_ties_and_frozen_base():
    from core.config import LoraConfig
    from core.models import apply_lora, fp32_master_weights

    class NoLauncher:
        class distributed_type:
            name = "NO"

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=1,
                      num_key_value_heads=1, head_dim=32, tie_word_embeddings=True)
    full = LlamaForCausalLM(cfg).to(torch.bfloat16)
    assert fp32_master_weights(full, NoLauncher) == len(list(full.parameters()))
    assert {p.dtype for p in full.parameters()} == {torch.float32}
    assert full.lm_head.weight is full.model.embed_tokens.weight  # still one tied Parameter
    lora = apply_lora(LlamaForCausalLM(cfg).to(torch.bfloat16), LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj"]))
    fp32_master_weights(lora, NoLauncher)
    assert {p.dtype for p in lora.parameters() if p.requires_grad} == {torch.float32}
    assert {p.dtype for p in lora.parameters() if not p.requires_grad} == {torch.bfloat16}

    class DeepSpeed:
        class distributed_type:
            name = "DEEPSPEED"

    assert fp32_master_weights(LlamaForCausalLM(cfg).to(torch.bfloat16), DeepSpeed) == 0
