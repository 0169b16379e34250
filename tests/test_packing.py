"""Packed rows (core/packing.py), issue 13: DPO's prefix sharing and packed SFT compute what separate rows
compute (loss, gradients, the stage's metrics), and activation checkpointing changes nothing but memory.

Everything in float32 on a tiny Llama (2 layers, hidden 64), SDPA with a dense mask on the CPU.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from alignment import dpo
from alignment.sft import collate_sft, sft_step
from core import models, packing
from core.config import DPOConfig, LoraConfig, load_recipe
from data import default_task
from data.io import write_jsonl


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> bool:
    """Equal to `rel` of the larger tensor's largest entry (float32 rounding, summed in another order)."""
    return bool((a - b).abs().max() <= rel * max(a.abs().max(), b.abs().max()))


def grads(model) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture(scope="module")
def sets():
    return default_task.generate(seed=3, n_sft=40, n_preference=40, n_eval_preference=0, n_eval_prompts=0, n_sampling_prompts=0)


def uneven_pairs(fmt, recs, n=5):
    """n pairs whose prompts and responses differ in length (so rows and pads differ)."""
    recs = sorted(recs, key=lambda r: len(r["chosen"][0]["content"]) + 3 * len(r["rejected"][0]["content"]))
    pick = [recs[i * (len(recs) - 1) // (n - 1)] for i in range(n)]
    pairs, _ = dpo.build_pairs(pick, fmt, 256)
    assert len({len(c) for c, _ in pairs}) > 2 and len({len(r) for _, r in pairs}) > 2
    assert len({c.prompt_len for c, _ in pairs}) > 1
    return pairs


# -- the layout ---------------------------------------------------------------------------------------------------
def test_prefix_row_layout_masks_and_positions(tiny_fmt, sets):
    """prompt, chosen, rejected: the rejected tokens see the prompt and themselves, never the chosen ones; their
    position ids continue from the prompt's end; the DPO and NLL masks land on each response's own tokens."""
    fmt = tiny_fmt
    pairs = uneven_pairs(fmt, sets["preference"])
    for mask_special, nll_special in ((True, True), (True, False), (False, True)):
        b = dpo.collate_pairs(pairs, fmt.pad_id, mask_special, nll_special, prefix_sharing=True)
        two = dpo.collate_pairs(pairs, fmt.pad_id, mask_special, nll_special, prefix_sharing=False)
        B = len(pairs)
        assert b["input_ids"].shape[0] == B and b["attention_mask"].shape[:2] == (B, 1)
        assert b["seq"][:, 1].tolist() == list(range(B)) and two["seq"][:, 1].tolist() == list(range(B)) * 2
        for i, (c, r) in enumerate(pairs):
            P = c.prompt_len
            assert c.input_ids[:P] == r.input_ids[:P]
            Lc, Lr = len(c) - P, len(r) - P
            ids, pos = b["input_ids"][i], b["position_ids"][i]
            assert ids[: P + Lc + Lr].tolist() == c.input_ids + r.input_ids[P:]
            assert pos[: P + Lc].tolist() == list(range(P + Lc)) and pos[P + Lc : P + Lc + Lr].tolist() == list(range(P, P + Lr))
            assert b["prev_pos"][i, P + Lc].item() == P - 1  # the rejected's first token: predicted by the prompt's last
            allowed = b["attention_mask"][i, 0] == 0  # [T, T]
            rej = slice(P + Lc, P + Lc + Lr)
            assert not allowed[rej, P : P + Lc].any() and allowed[rej, :P].all()
            assert allowed[P : P + Lc, :P].all() and allowed[rej, rej].equal(torch.ones(Lr, Lr, dtype=torch.bool).tril())
            # the masks, token for token, are the two-row layout's
            for key, row, n in (("chosen_mask", i, P + Lc), ("nll_mask", i, P + Lc)):
                assert b[key][i, :n].tolist() == two[key][row, :n].tolist() and not b[key][i, n:].any()
            assert b["rejected_mask"][i, rej].tolist() == two["rejected_mask"][B + i, P : P + Lr].tolist()
            assert not b["rejected_mask"][i, : P + Lc].any() and not b["rejected_mask"][i, P + Lc + Lr :].any()
        for key in ("chosen_mask", "rejected_mask", "nll_mask"):
            assert b[key].sum() == two[key].sum() > 0


def test_reward_one_row_is_the_shared_prefix_row(tiny_fmt, sets):
    """The reward model's one row and DPO's prefix sharing are the same mechanism (core.packing.prefix_row)."""
    from reward.model import collate_one_row
    from reward.train import build_examples

    ex = build_examples(sets["preference"][:6], tiny_fmt)
    groups = [e["encs"] for e in ex]
    one = collate_one_row(groups, tiny_fmt.pad_id, rng=random.Random(0))
    rows = [packing.prefix_row(g, random.Random(0)) for g in groups[:1]]
    assert one["input_ids"][0, : len(rows[0])].tolist() == rows[0].ids


def test_pack_greedy_first_fit():
    assert packing.pack_greedy([5, 4, 3, 6, 2], 8) == [[0, 2], [1, 4], [3]]
    assert packing.pack_greedy([9, 2], 8) == [[0], [1]]  # longer than a row: a row of its own
    assert packing.pack_greedy([3, 3, 3], 100) == [[0, 1, 2]]


# -- DPO: prefix sharing == two rows ---------------------------------------------------------------------------------
@pytest.mark.parametrize("mask_special,nll_special", [(True, True), (True, False), (False, True)])
def test_prefix_shared_dpo_equals_two_rows(tiny_fmt, tiny_lm, sets, mask_special, nll_special):
    """One forward per micro-batch of B prefix-shared rows gives the two-row path's reference log-probs, loss,
    metrics and gradients (1e-5 relative, float32), on pairs of unequal lengths, with accumulation."""
    fmt = tiny_fmt
    model, ref = tiny_lm(fmt, seed=0), tiny_lm(fmt, seed=1).eval()
    pairs = uneven_pairs(fmt, sets["preference"])
    cfg = DPOConfig(mask_special_tokens=mask_special, nll_mask_special_tokens=nll_special)
    acc = Accelerator(cpu=True)
    out = {}
    # two rows a pair; a prefix-shared row a pair; pairs packed 2-3 to a row; a micro-batch's pairs in one row
    for layout in ((False, 0), (True, 0), (True, 150), (True, 10_000)):
        micro = []
        for chunk in (pairs[:3], pairs[3:]):
            mb = dpo.collate_pairs(chunk, fmt.pad_id, mask_special, nll_special, prefix_sharing=layout[0], pack_tokens=layout[1])
            mb["ref_chosen"], mb["ref_rejected"] = dpo.reference_logps(mb, ref_model=ref)
            micro.append(mb)
        model.zero_grad(set_to_none=True)
        stats = dpo.dpo_step(model, micro, cfg, acc, 1)
        refs = torch.cat([torch.stack([mb["ref_chosen"], mb["ref_rejected"]]) for mb in micro], 1)
        out[layout] = (stats, grads(model), refs, [mb["input_ids"].shape[0] for mb in micro])
    s2, g2, r2, _ = out[(False, 0)]
    assert out[(True, 150)][3] != out[(True, 0)][3] and out[(True, 10_000)][3] == [1, 1]  # packing did pack
    for layout in ((True, 0), (True, 150), (True, 10_000)):
        s1, g1, r1, _ = out[layout]
        assert close(r1, r2, 1e-6), layout
        assert s1["pairs"] == s2["pairs"] == len(pairs) and s1["tokens"] == s2["tokens"] > 0
        for k in (*dpo.METRICS, "dpo"):
            assert s1[k] == pytest.approx(s2[k], rel=1e-5, abs=1e-6), (layout, k)
        assert abs(s1["rewards/margins"]) > 1e-3  # a real DPO term: policy and reference differ
        assert g1.keys() == g2.keys() and len(g1) == len(list(model.parameters()))
        for n in g2:
            assert close(g1[n], g2[n]), (layout, n)


def test_packed_dpo_rows_layout(tiny_fmt, sets):
    """Packed pairs: each pair's prompt, chosen and rejected back to back, `seq` naming its pair on every token,
    and no token of one pair seeing another pair's."""
    fmt = tiny_fmt
    pairs = uneven_pairs(fmt, sets["preference"])
    b = dpo.collate_pairs(pairs, fmt.pad_id, prefix_sharing=True, pack_tokens=10_000)
    assert b["input_ids"].shape[0] == 1
    at, allowed = 0, b["attention_mask"][0, 0] == 0
    for i, (c, r) in enumerate(pairs):
        P = len(packing.split_prompt([c, r])[0])
        n = len(c) + len(r) - P
        assert b["input_ids"][0, at : at + n].tolist() == c.input_ids + r.input_ids[P:]
        assert b["seq"][0, at + 1 : at + n].eq(i).all()
        assert allowed[at : at + n, at : at + n].any() and not allowed[at : at + n, :at].any()
        at += n
    assert at == b["input_ids"].shape[1]  # no pad


def test_flex_block_mask_is_the_dense_mask(tiny_fmt, sets):
    """FlexAttention's mask rule (packing.mask_rule, what block_mask compresses) allows exactly what the dense
    4D mask allows, for packed and padded prefix-shared rows."""
    from torch.nn.attention.flex_attention import create_mask

    fmt = tiny_fmt
    pairs = uneven_pairs(fmt, sets["preference"])
    for pack in (0, 150):
        dense = dpo.collate_pairs(pairs, fmt.pad_id, prefix_sharing=True, pack_tokens=pack)
        flex = dpo.collate_pairs(pairs, fmt.pad_id, prefix_sharing=True, pack_tokens=pack, flex=True)
        assert "attention_mask" not in flex and flex["input_ids"].equal(dense["input_ids"])
        B, T = flex["doc"].shape
        allowed = create_mask(packing.mask_rule(flex["doc"], flex["branch"]), B, 1, T, T, device="cpu")
        assert allowed.equal(dense["attention_mask"] == 0)
        assert (dense["input_ids"] == fmt.pad_id).any() and not allowed.all()


def _random_rows(rng: random.Random, B: int) -> tuple[torch.Tensor, torch.Tensor]:
    """doc, branch [B, T] of rows as the packer lays them out: documents in increasing id, each a prompt
    (branch 0) and 0, 2 or 3 responses (branches 1..), pads (doc -1) after; T often past a whole block."""
    rows = []
    for _ in range(B):
        doc, branch = [], []
        for d in range(rng.randint(1, 6)):
            n = rng.randint(5, 400)
            doc, branch = doc + [d] * n, branch + [0] * n
            for r in range(rng.choice([0, 2, 3])):
                n = rng.randint(3, 300)
                doc, branch = doc + [d] * n, branch + [r + 1] * n
        rows.append((doc, branch))
    T = max(len(d) for d, _ in rows) + rng.choice([0, 37, 300])
    doc, branch = torch.full((B, T), packing.PAD_DOC), torch.zeros((B, T), dtype=torch.long)
    for b, (d, r) in enumerate(rows):
        doc[b, : len(d)], branch[b, : len(r)] = torch.tensor(d), torch.tensor(r)
    return doc, branch


def test_block_mask_equals_create_block_mask(tiny_fmt, sets):
    """packing.block_mask (blocks counted from segments) is create_block_mask's BlockMask of the same rule:
    the same partial and full blocks, in the same order, both ways (kv and q), for packed DPO rows and random
    rows of several documents, 2-3 responses, pads and lengths that are not whole blocks."""
    from torch.nn.attention.flex_attention import create_block_mask

    rng = random.Random(0)
    pairs = uneven_pairs(tiny_fmt, sets["preference"])
    batch = dpo.collate_pairs(pairs, tiny_fmt.pad_id, prefix_sharing=True, pack_tokens=150, flex=True)
    cases = [(batch["doc"], batch["branch"])] + [_random_rows(rng, rng.randint(1, 3)) for _ in range(30)]
    n_full = 0
    for doc, branch in cases:
        B, T = doc.shape
        ours = packing.block_mask(doc, branch)
        ref = create_block_mask(packing.mask_rule(doc, branch), B, None, T, T, device="cpu")
        assert ours.shape == ref.shape and ours.BLOCK_SIZE == ref.BLOCK_SIZE
        for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
                     "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices"):
            assert getattr(ours, name).equal(getattr(ref, name)), name
        n_full += int(ref.full_kv_num_blocks.sum())
    assert n_full > 100  # the cases hold full blocks, not only partial ones


def test_flex_attention_forward_equals_sdpa(tiny_fmt, tiny_lm, sets):
    """The model with attn_implementation flex_attention and the BlockMask gives the dense-mask SDPA log-probs
    (forward only: FlexAttention has no backward on the CPU; the GPU benchmark trains with it)."""
    fmt = tiny_fmt
    pairs = uneven_pairs(fmt, sets["preference"])[:4]
    model = tiny_lm(fmt, seed=0).eval()
    with torch.no_grad():
        dense = dpo.pair_logps(model, dpo.collate_pairs(pairs, fmt.pad_id, prefix_sharing=True, pack_tokens=150))
        model.set_attn_implementation("flex_attention")
        flex = dpo.pair_logps(model, dpo.collate_pairs(pairs, fmt.pad_id, prefix_sharing=True, pack_tokens=150, flex=True))
    for a, b in zip(dense, flex):
        assert close(b, a, 1e-5)


def _write(path: Path, recs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


@pytest.fixture(scope="module")
def model_dir(tiny_fmt, tiny_lm, tmp_path_factory):
    d = tmp_path_factory.mktemp("packing") / "base"
    tiny_lm(tiny_fmt, seed=0).save_pretrained(d, safe_serialization=True)
    tiny_fmt.tokenizer.save_pretrained(d)
    return d


@pytest.mark.parametrize("precompute", [True, False])
def test_dpo_stage_metrics_equal_with_and_without_prefix_sharing(model_dir, sets, tmp_path, precompute):
    """dpo.main with prefix_sharing on and off: the same step losses, rewards, NLL and token counts."""
    data = _write(tmp_path / "pref.jsonl", sets["preference"][:24])
    logs, metrics = {}, {}
    for shared, pack in ((True, 0), (False, 0), (True, 300)):
        recipe = load_recipe(None, ["dpo.lr=3e-3", "dpo.max_steps=3", "dpo.batch_size=4", "dpo.grad_accum=2",
                                    "dpo.log_every=1", "dpo.report_to=none", "dpo.max_length=128", f"dpo.pack_tokens={pack}",
                                    f"dpo.precompute_ref={str(precompute).lower()}", f"dpo.prefix_sharing={str(shared).lower()}"])
        out = tmp_path / f"dpo-{shared}-{pack}"
        metrics[shared, pack] = dpo.main(recipe, out, {"model": model_dir, "data": data})
        logs[shared, pack] = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert metrics[True, 0]["prefix_sharing"] is True and metrics[False, 0]["prefix_sharing"] is False
    assert metrics[True, 300]["pack_tokens"] == 300
    for layout in ((True, 0), (True, 300)):
        assert len(logs[layout]) == len(logs[False, 0]) == 3
        for a, b in zip(logs[layout], logs[False, 0]):
            for k in ("train/loss", "train/dpo", "train/nll", "train/rewards/margins", "train/logps/chosen",
                      "train/logps/rejected", "train/grad_norm", "train/lr", "train/tokens"):
                assert a[k] == pytest.approx(b[k], rel=1e-5, abs=2e-6), (layout, k)  # logged rounded to 1e-6
        for k in dpo.METRICS:
            assert metrics[layout][k] == pytest.approx(metrics[False, 0][k], rel=1e-5, abs=2e-6), (layout, k)  # rounded to 1e-6


# -- SFT: packed == a row each ----------------------------------------------------------------------------------------
def test_packed_sft_layout(tiny_fmt, sets):
    fmt = tiny_fmt
    encs = [fmt.encode(r["messages"]) for r in sets["sft"][:6]]
    cap = 2 * max(len(e) for e in encs) + 1  # two conversations a row at least
    b = collate_sft(encs, fmt.pad_id, cap)
    assert "attention_mask" not in b and b["input_ids"].shape[0] < len(encs) and b["input_ids"].shape[1] <= cap
    bins = packing.pack_greedy([len(e) for e in encs], cap)
    for row, members in enumerate(bins):
        at = 0
        for i in members:
            n = len(encs[i])
            assert b["input_ids"][row, at : at + n].tolist() == encs[i].input_ids
            assert b["position_ids"][row, at : at + n].tolist() == list(range(n))  # restarting
            assert b["loss_mask"][row, at : at + n].tolist() == encs[i].assistant_mask
            assert b["prev_pos"][row, at].item() == -1
            at += n
        assert (b["input_ids"][row, at:] == fmt.pad_id).all() and not b["loss_mask"][row, at:].any()
    assert b["loss_mask"].sum() == sum(sum(e.assistant_mask) for e in encs)


@pytest.mark.parametrize("pack_tokens", [60, 150, 10_000])
def test_packed_sft_equals_unpacked(tiny_fmt, tiny_lm, sets, pack_tokens):
    """Packed rows (several conversations each, one row for all, or conversations longer than a row) give the
    unpacked loss and gradients (1e-5 relative, float32), normalised over the trained tokens of the whole
    step across micro-batches."""
    fmt = tiny_fmt
    encs = [fmt.encode(r["messages"]) for r in sets["sft"][:8]]
    assert len({len(e) for e in encs}) > 3
    acc = Accelerator(cpu=True)
    model = tiny_lm(fmt, seed=0)
    out = {}
    for pack in (0, pack_tokens):
        micro = [collate_sft(encs[:5], fmt.pad_id, pack), collate_sft(encs[5:], fmt.pad_id, pack)]
        model.zero_grad(set_to_none=True)
        loss, n = sft_step(model, micro, acc, world_size=1)
        out[pack] = (loss, n, grads(model), sum(mb["input_ids"].numel() for mb in micro))
    (l0, n0, g0, cells0), (l1, n1, g1, cells1) = out[0], out[pack_tokens]
    assert n0 == n1 and l1 == pytest.approx(l0, rel=1e-5)
    if pack_tokens >= sum(len(e) for e in encs):  # a micro-batch in one row: no pad position at all
        assert cells1 == sum(len(e) for e in encs) < cells0
    for k in g0:
        assert close(g1[k], g0[k]), k


def test_packed_sft_needs_its_per_document_mask(tiny_fmt, tiny_lm, sets):
    """The check above is sensitive: the same packed rows with a plain causal mask (attention across
    conversations) give another loss."""
    from core.logps import completion_logps

    fmt = tiny_fmt
    encs = [fmt.encode(r["messages"]) for r in sets["sft"][:4]]
    b = collate_sft(encs, fmt.pad_id, 10_000)
    model = tiny_lm(fmt).eval()
    with torch.no_grad():
        args = (model, b["input_ids"])
        packed = completion_logps(*args, None, [b["loss_mask"]], prev_pos=b["prev_pos"], position_ids=b["position_ids"])[0]
        leaky = completion_logps(*args, torch.ones_like(b["input_ids"]), [b["loss_mask"]], prev_pos=b["prev_pos"],
                                 position_ids=b["position_ids"])[0]
        sep = sum(completion_logps(model, torch.tensor([e.input_ids]), None, [torch.tensor([e.assistant_mask])])[0] for e in encs)
    assert packed.item() == pytest.approx(sep.item(), rel=1e-5)
    assert abs(leaky.item() - sep.item()) > 1e-2


def test_sft_stage_packed_equals_unpacked(model_dir, sets, tmp_path):
    data = tmp_path / "sft.jsonl"
    write_jsonl(data, sets["sft"][:24])
    logs = {}
    for pack in (0, 512):
        recipe = load_recipe(None, ["sft.lr=1e-2", "sft.max_steps=3", "sft.batch_size=4", "sft.grad_accum=2", "sft.log_every=1",
                                    "sft.report_to=none", "sft.warmup_ratio=0", f"sft.pack_tokens={pack}"])
        from alignment import sft

        m = sft.main(recipe, tmp_path / f"sft-{pack}", {"model": model_dir, "data": data})
        logs[pack] = [json.loads(line) for line in (tmp_path / f"sft-{pack}" / "train_log.jsonl").read_text().splitlines()]
        assert m["examples_per_s"] > 0
    for a, b in zip(logs[0], logs[512], strict=True):
        for k in ("train/loss", "train/grad_norm", "train/tokens"):
            assert a[k] == pytest.approx(b[k], rel=1e-5), k


# -- activation checkpointing ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lora", [False, True])
def test_gradient_checkpointing_changes_nothing_but_memory(tiny_fmt, tiny_lm, sets, lora):
    fmt = tiny_fmt
    encs = [fmt.encode(r["messages"]) for r in sets["sft"][:4]]
    acc = Accelerator(cpu=True)
    out = {}
    for on in (False, True):
        model = tiny_lm(fmt, seed=0)
        if lora:
            model = models.apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0))
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if "lora_B" in n:
                        p.normal_(0, 0.05)  # seeded by tiny_lm's manual_seed: the same in both runs
        models.gradient_checkpointing(model, on)
        model.train()
        assert getattr(model, "is_gradient_checkpointing", False) == on
        out[on] = (*sft_step(model, [collate_sft(encs, fmt.pad_id)], acc, 1), grads(model))
    (l0, n0, g0), (l1, n1, g1) = out[False], out[True]
    assert l0 == pytest.approx(l1, rel=1e-6) and n0 == n1
    assert g0.keys() == g1.keys() and (any("lora_" in k for k in g0) == lora)
    for k in g0:
        assert close(g0[k], g1[k], 1e-6), k


def test_reward_model_gradient_checkpointing_changes_nothing(model_dir, tiny_fmt, sets):
    """The reward stage checkpoints its backbone too (RewardScorer calls the HF model's decoder directly)."""
    from reward.model import RewardScorer, init_reward_model
    from reward.train import build_examples, collate_preferences, reward_step

    ex = build_examples(sets["preference"][:4], tiny_fmt)
    acc = Accelerator(cpu=True)
    out = {}
    for on in (False, True):
        model, _ = init_reward_model(model_dir, tiny_fmt.pad_id, seed=0)
        models.gradient_checkpointing(model, on)
        scorer = RewardScorer(model).train()
        assert model.is_gradient_checkpointing == on
        batch = collate_preferences(ex, tiny_fmt.pad_id, True, rng=random.Random(0))
        loss, _, n = reward_step(scorer, [batch], acc, 1)
        out[on] = (loss, grads(scorer))
    assert out[False][0] == pytest.approx(out[True][0], rel=1e-6)
    for k in out[False][1]:
        assert close(out[False][1][k], out[True][1][k], 1e-6), k


def test_recipes_turn_checkpointing_on_for_8b_only():
    root = Path(__file__).resolve().parents[1] / "recipes"
    default = load_recipe(root / "default.yaml")
    assert not any(getattr(default, s).gradient_checkpointing for s in ("sft", "reward", "dpo"))
    assert default.dpo.prefix_sharing and default.sft.pack_tokens == 0
    for name in ("llama-3.1-8b-instruct-lora.yaml", "llama-3.1-8b-instruct-full.yaml"):
        r = load_recipe(root / name)
        assert all(getattr(r, s).gradient_checkpointing for s in ("sft", "reward", "dpo")), name
