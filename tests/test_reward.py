"""Reward model: loss by hand, reward position, exact one-row layout, gradient accumulation, a smoke run."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from core import distributed, models
from core.config import LoraConfig, ModelConfig, load_recipe
from reward.loss import bradley_terry_loss, bradley_terry_loss_sum, pair_margin
from reward.model import (RewardScorer, apply_lora, collate_one_row, collate_separate, init_reward_model,
                          load_reward_model, score_sequences)
from reward.train import build_examples, collate_preferences, reward_step

U = lambda text: [{"role": "user", "content": text}]  # noqa: E731
A = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731


# -- fixtures: a tiny tokenizer + causal LM, built once ------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from data import default_task
    from data.tiny import make_model, train_tokenizer

    d = tmp_path_factory.mktemp("tiny")
    sets = default_task.generate(0, n_sft=40, n_preference=40, n_eval_preference=12, n_eval_prompts=4, n_sampling_prompts=4)
    fmt = train_tokenizer(default_task.corpus(sets), d / "base", 384)
    cfg = ModelConfig(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128, vocab_size=384)
    make_model(fmt, d / "base", cfg, seed=0)
    return {"dir": d, "base": d / "base", "fmt": fmt, "sets": sets}


@pytest.fixture(scope="module")
def rm(tiny):
    model, new_head = init_reward_model(tiny["base"], tiny["fmt"].pad_id, seed=0)
    assert new_head
    return model.eval()


def three(fmt):
    """Preference rows with 3 and 2 responses of different lengths."""
    recs = [
        {"prompt": U("Repeat the word river 3 times."), "edited": A("river river river"),
         "chosen": A("Sure! Here it is: river river river"), "rejected": A("river river")},
        {"prompt": U("Write the word stone in capital letters."), "chosen": A("STONE"), "rejected": A("Stone. Hope this helps!")},
        {"prompt": U("Reverse the list: red, blue, green, apple."), "edited": A("apple, green, blue, red"),
         "chosen": A("Here you go: apple, green, blue, red"), "rejected": A("red")},
    ]
    return recs, build_examples(recs, fmt)


# -- loss -------------------------------------------------------------------------------------------------
def test_identical_pair_costs_ln2_with_zero_gradient():
    r = torch.tensor([0.7, -1.3], requires_grad=True)
    loss = bradley_terry_loss(r, r)
    loss.backward()
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
    assert torch.all(r.grad == 0)


def test_two_pairs_by_hand_and_margin():
    rb, rw = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    # x = [1, -1]: (log(1 + e^-1) + log(1 + e^1)) / 2
    want = (math.log1p(math.exp(-1)) + math.log1p(math.exp(1))) / 2
    assert bradley_terry_loss(rb, rw).item() == pytest.approx(want, abs=1e-6)
    assert bradley_terry_loss_sum(rb, rw).item() == pytest.approx(2 * want, abs=1e-6)
    # margin m = [0.5, 1]: x = [0.5, -2]
    want_m = (math.log1p(math.exp(-0.5)) + math.log1p(math.exp(2))) / 2
    assert bradley_terry_loss(rb, rw, torch.tensor([0.5, 1.0])).item() == pytest.approx(want_m, abs=1e-6)
    # default margins: rank gap x margin_per_rank, or the record's own margin
    assert pair_margin({}, "edited", "rejected", 0.5) == 1.0
    assert pair_margin({}, "chosen", "rejected", 0.5) == 0.5
    assert pair_margin({"margin": 3}, "edited", "chosen", 0.5) == 3.0


def test_ranked_row_gives_every_ordered_pair(tiny):
    recs, ex = three(tiny["fmt"])
    assert [len(e["pairs"]) for e in ex] == [3, 1, 3]
    keys = ex[0]["keys"]
    assert [(keys[b], keys[w]) for b, w in ex[0]["pairs"]] == [("edited", "chosen"), ("edited", "rejected"), ("chosen", "rejected")]
    assert ex[1]["keys"] == ["chosen", "rejected"] and ex[1]["pairs"] == [(0, 1)]
    assert ex[0]["margins"] == [1.0, 2.0, 1.0]
    batch = collate_preferences(ex, tiny["fmt"].pad_id, one_row=True)
    assert batch["better"].tolist() == [0, 0, 1, 3, 5, 5, 6] and batch["worse"].tolist() == [1, 2, 2, 4, 6, 7, 7]


def test_margin_off_by_default_and_on_by_config(tiny, rm):
    fmt = tiny["fmt"]
    assert load_recipe(None).reward.margin is False
    assert load_recipe(None, ["reward.margin=true"]).reward.margin is True
    _, ex = three(fmt)
    batch = collate_preferences(ex, fmt.pad_id, one_row=False)
    scorer = RewardScorer(rm)
    with torch.no_grad():
        r = scorer(**{k: batch[k] for k in ("input_ids", "attention_mask", "position_ids", "index")}).tolist()
    acc = distributed.make_accelerator(tiny["dir"], "none")
    by_hand = {}
    for use_margin in (False, True):
        terms = [math.log1p(math.exp(-(r[b] - r[w] - (m if use_margin else 0.0))))
                 for b, w, m in zip(batch["better"].tolist(), batch["worse"].tolist(), batch["margin"].tolist())]
        by_hand[use_margin] = sum(terms) / len(terms)
        loss, _, n = reward_step(scorer, [batch], acc, 1, use_margin)
        scorer.zero_grad()
        assert n == 7 and loss == pytest.approx(by_hand[use_margin], abs=1e-5)
    assert by_hand[True] > by_hand[False] + 0.5


# -- where the reward is read, and the one-row layout -----------------------------------------------------------
def test_reward_at_final_eot_whatever_the_padding(tiny, rm):
    fmt = tiny["fmt"]
    recs, ex = three(fmt)
    encs = [e for x in ex for e in x["encs"]]
    scorer = RewardScorer(rm)
    with torch.no_grad():
        out = {}
        longest = max(len(e) for e in encs)
        for side, pad_to in (("right", 0), ("right", longest + 9), ("left", 0), ("left", longest + 9)):
            b = collate_separate(encs, fmt.pad_id, side=side, pad_to=pad_to)
            tok = b["input_ids"][b["index"][:, 0], b["index"][:, 1]]
            assert torch.all(tok == fmt.eot_id)
            out[(side, pad_to)] = scorer(**b)
        one = torch.tensor([scorer(**collate_separate([e], fmt.pad_id)).item() for e in encs])
        # HF's own pooling (last non-pad id) agrees on right padding, where it is correct
        right = collate_separate(encs, fmt.pad_id)
        hf = rm(input_ids=right["input_ids"], attention_mask=right["attention_mask"]).logits.squeeze(-1)
    for v in out.values():
        torch.testing.assert_close(v, one, atol=1e-5, rtol=0)
    torch.testing.assert_close(hf, one, atol=1e-5, rtol=0)
    # score_sequences: input order kept, same values, floats
    got = score_sequences(rm, fmt, encs, batch_size=3)
    assert all(isinstance(x, float) for x in got)
    assert got == pytest.approx(one.tolist(), abs=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_one_row_equals_separate_rows(tiny, attn):
    fmt = tiny["fmt"]
    model, _ = init_reward_model(tiny["base"], fmt.pad_id, attn_implementation=attn, seed=1)
    model.eval()
    _, ex = three(fmt)  # 3, 2 and 3 responses of different lengths
    groups = [e["encs"] for e in ex]
    scorer = RewardScorer(model)
    with torch.no_grad():
        sep = scorer(**collate_separate([e for g in groups for e in g], fmt.pad_id))
        T = max(len(collate_one_row([g], fmt.pad_id)["input_ids"][0]) for g in groups) + 7  # extra padding on every row
        for seed in (0, 1, 2):
            b = collate_one_row(groups, fmt.pad_id, rng=random.Random(seed), pad_to=T)
            assert b["input_ids"].shape[0] == 3 and b["attention_mask"].shape == (3, 1, T, T)
            torch.testing.assert_close(scorer(**b), sep, atol=1e-5, rtol=0)
    # the prompt is encoded once: the row is shorter than the separate rows together
    b = collate_one_row(groups[:1], fmt.pad_id)
    assert b["input_ids"].shape[1] < sum(len(e) for e in groups[0])
    assert sep.dtype == torch.float32


def test_packed_one_rows_equal_separate_rows(tiny):
    """reward.pack_tokens: several records' one-rows packed into one row (each its own document) give the
    separate rows' rewards, in the records' order, and the step's loss and gradients of the unpacked one-rows."""
    fmt = tiny["fmt"]
    model, _ = init_reward_model(tiny["base"], fmt.pad_id, seed=1)
    _, ex = three(fmt)
    groups = [e["encs"] for e in ex]
    scorer = RewardScorer(model).eval()
    with torch.no_grad():
        sep = scorer(**collate_separate([e for g in groups for e in g], fmt.pad_id))
        whole = collate_one_row(groups, fmt.pad_id, rng=random.Random(0), pack_tokens=10_000)
        two = collate_one_row(groups, fmt.pad_id, rng=random.Random(0), pack_tokens=len(whole["input_ids"][0]) - 1)
        assert whole["input_ids"].shape[0] == 1 and (whole["input_ids"] != fmt.pad_id).all()  # one row, no pad
        assert two["input_ids"].shape[0] == 2
        for b in (whole, two):
            torch.testing.assert_close(scorer(**b), sep, atol=1e-5, rtol=0)
    scorer.train()
    acc = distributed.make_accelerator(tiny["dir"], "none")
    out = []
    for pack in (0, 10_000):
        batch = collate_preferences(ex, fmt.pad_id, True, rng=random.Random(0), pack_tokens=pack)
        loss, _, n = reward_step(scorer, [batch], acc, 1)
        out.append((loss, {k: p.grad.clone() for k, p in scorer.named_parameters()}))
        scorer.zero_grad(set_to_none=True)
    assert out[0][0] == pytest.approx(out[1][0], rel=1e-5)
    for k in out[0][1]:
        torch.testing.assert_close(out[1][1][k], out[0][1][k], atol=1e-6, rtol=1e-4)


def test_one_row_shuffles_placement_but_not_reward_order(tiny):
    fmt = tiny["fmt"]
    _, ex = three(fmt)
    seen = set()
    for seed in range(8):
        b = collate_one_row([ex[0]["encs"]], fmt.pad_id, rng=random.Random(seed))
        seen.add(tuple(b["index"][:, 1].tolist()))
        tok = b["input_ids"][0, b["index"][:, 1]]
        assert torch.all(tok == fmt.eot_id)
    assert len(seen) > 1


# -- gradient accumulation -------------------------------------------------------------------------------------
@pytest.mark.parametrize("one_row", [True, False])
def test_grad_accum_equals_one_big_batch(tiny, one_row):
    fmt = tiny["fmt"]
    recs, ex = three(fmt)
    ex = ex + build_examples([{"prompt": U("Repeat the word stone 2 times."), "chosen": A("stone stone"), "rejected": A("stone")}], fmt)
    model, _ = init_reward_model(tiny["base"], fmt.pad_id, seed=0)
    scorer = RewardScorer(model).train()
    acc = distributed.make_accelerator(tiny["dir"], "none")
    grads, losses = [], []
    for micro in ([ex], [[e] for e in ex]):
        batches = [collate_preferences(m, fmt.pad_id, one_row, rng=random.Random(0)) for m in micro]
        loss, _, n = reward_step(scorer, batches, acc, 1)
        assert n == 8
        losses.append(loss)
        grads.append({k: p.grad.clone() for k, p in scorer.named_parameters()})
        scorer.zero_grad(set_to_none=True)
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], atol=1e-6, rtol=1e-4)


# -- LoRA and saving ---------------------------------------------------------------------------------------------
def test_lora_trains_head_and_saves_a_loadable_reward_model(tiny, tmp_path):
    fmt = tiny["fmt"]
    model, _ = init_reward_model(tiny["base"], fmt.pad_id, seed=0)
    model = apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("score" in n for n in trainable) and any("lora_" in n for n in trainable)
    scorer = RewardScorer(model)
    _, ex = three(fmt)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)  # B starts at 0: make the adapters count
    encs = [e for x in ex for e in x["encs"]]
    before = score_sequences(scorer, fmt, encs, 4)
    models.save_model(model, fmt.tokenizer, tmp_path / "rm")
    loaded = load_reward_model(tmp_path / "rm")
    assert loaded.config.pad_token_id == fmt.pad_id
    assert score_sequences(loaded, fmt, encs, 4) == pytest.approx(before, abs=1e-5)


# -- the stage ---------------------------------------------------------------------------------------------------
def test_stage_smoke_run(tiny, tmp_path):
    from safetensors.torch import load_file

    from data import default_task
    from reward import train

    fmt = tiny["fmt"]
    good = tiny["sets"]["preference"][:8]
    bad = ['{"prompt": "not closed', json.dumps({"prompt": U("Repeat the word river 2 times."), "chosen": A("x")}),
           json.dumps({"prompt": U("Repeat the word river 2 times."), "chosen": A("river river"), "rejected": A("river river")})]
    data = tmp_path / "pref.jsonl"
    data.write_text("\n".join([json.dumps(r) for r in good[:4]] + bad + [json.dumps(r) for r in good[4:]]) + "\n")
    eval_data = tmp_path / "eval.jsonl"
    eval_data.write_text("\n".join(json.dumps(r) for r in tiny["sets"]["eval_preference"]) + "\n")
    recipe = load_recipe(None, ["reward.lr=3e-3", "reward.batch_size=4", "reward.max_steps=8", "reward.warmup_ratio=0",
                                "reward.report_to=none", "reward.max_length=128", "reward.log_every=1"])
    out = tmp_path / "reward"
    m = train.main(recipe, out, {"model": tiny["base"], "data": data, "eval_data": eval_data})

    assert m["data"]["n_rejected"] == 3 and m["data"]["n_kept"] == 8
    assert m["steps"] == 8 and m["final_loss"] < m["first_loss"]
    scored = json.loads((out / "eval_rewards.json").read_text())
    assert m["eval_pairs"] == len(scored) > 0  # the accuracy is the share of held-out pairs ranked right
    assert m["rm_accuracy"] == round(sum(p["r_better"] > p["r_worse"] for p in scored) / len(scored), 4)
    assert set(m["rm_accuracy_by_category"]) <= set(default_task.CATEGORIES)
    assert sum(b["n"] for b in m["calibration"]) == m["eval_pairs"]
    assert {"margin_mean", "margin_median"} <= set(m)
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 8 and "train/accuracy" in log[0]

    # every trainable parameter changed (the head against its seeded initialisation)
    init, _ = init_reward_model(tiny["base"], fmt.pad_id, seed=recipe.seed)
    before = init.state_dict()
    after = load_file(str(out / "model" / "model.safetensors"))
    assert set(after) == set(before)
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert unchanged == []
    rm = load_reward_model(out / "model")
    assert rm.config.architectures == ["LlamaForSequenceClassification"]


@pytest.mark.parametrize("one_row", [True, False])
def test_stage_bf16_recipe(tiny, tmp_path, one_row):
    """A bf16 recipe trains float32 masters under bf16 autocast (the one-row mask stays float32, which SDPA
    takes with bf16 queries) and saves the reward model in bf16."""
    from safetensors.torch import load_file

    from core.models import load_causal_lm
    from reward import train

    base = tmp_path / "bf16"
    load_causal_lm(tiny["base"], "bfloat16").save_pretrained(base, safe_serialization=True)
    tiny["fmt"].tokenizer.save_pretrained(base)
    data = tmp_path / "pref.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in tiny["sets"]["preference"][:8]))
    recipe = load_recipe(None, ["model.dtype=bfloat16", "reward.lr=1e-3", "reward.batch_size=4", "reward.max_steps=3",
                                "reward.report_to=none", "reward.max_length=128", f"reward.one_row={str(one_row).lower()}"])
    m = train.main(recipe, tmp_path / "reward", {"model": base, "data": data})
    assert m["steps"] == 3 and math.isfinite(m["final_loss"])
    saved = load_file(str(tmp_path / "reward" / "model" / "model.safetensors"))
    assert {v.dtype for v in saved.values()} == {torch.bfloat16} and "score.weight" in saved
