"""DPO stage (Llama 3): the loss by hand and against TRL, masks, gradient accumulation, the reference, a smoke run.

Everything runs on a tiny Llama (2 layers, hidden 64) with a tokenizer trained on a few default-task records.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from alignment import dpo
from core.config import DPOConfig, LoraConfig, ModelConfig, load_recipe
from core.losses import dpo_loss, dpo_nll_loss
from tests.conftest import full_logps, kill_at_first_checkpoint
from data import default_task
from data.tiny import make_model, train_tokenizer

LN2 = math.log(2.0)
TINY = ModelConfig(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128,
                   vocab_size=512, max_position_embeddings=256)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(fmt, model dir, policy model, a different 'reference' model, task data)."""
    root = tmp_path_factory.mktemp("dpo")
    sets = default_task.generate(0, n_sft=20, n_preference=24, n_eval_preference=2, n_eval_prompts=4, n_sampling_prompts=2)
    fmt = train_tokenizer(default_task.corpus(sets), root / "model", TINY.vocab_size)
    model = make_model(fmt, root / "model", TINY, seed=0)
    other = make_model(fmt, root / "other", TINY, seed=1)
    return fmt, root / "model", model, other, sets


def pairs_of(fmt, recs, mask=True, n=None):
    pairs, _ = dpo.build_pairs(recs[:n] if n else recs, fmt, 256)
    return pairs, dpo.collate_pairs(pairs, fmt.pad_id, mask)


# -- the loss --------------------------------------------------------------------------------------------------
def test_hand_worked_two_pairs():
    """beta 0.1; pair 1: (pc-rc)-(pr-rr) = (-5+6)-(-7+6) = 2 -> -log s(0.2) = log(1+e^-0.2) = 0.5981389;
    pair 2: (-8+7)-(-6+7) = -2 -> log(1+e^0.2) = 0.7981389; mean 0.6981389.
    NLL: chosen sums -5 and -8 over 4 + 5 = 9 tokens -> 13/9 = 1.4444444; total 0.6981389 + 0.2 * 1.4444444."""
    pc, pr = torch.tensor([-5.0, -8.0]), torch.tensor([-7.0, -6.0])
    rc, rr = torch.tensor([-6.0, -7.0]), torch.tensor([-6.0, -7.0])
    losses, cr, rj = dpo_loss(pc, pr, rc, rr, beta=0.1)
    assert torch.allclose(losses, torch.tensor([0.5981389, 0.7981389]), atol=1e-6)
    assert torch.allclose(cr, torch.tensor([0.1, -0.1])) and torch.allclose(rj, torch.tensor([-0.1, 0.1]))
    loss, _, _, _ = dpo_nll_loss(pc, pr, rc, rr, beta=0.1, nll_weight=0.2, n_chosen_tokens=9)
    assert abs(float(loss) - (0.6981389 + 0.2 * 13 / 9)) < 1e-6
    # the step's counts, not this batch's, normalise: half of a 4-pair, 18-token step
    half, _, _, _ = dpo_nll_loss(pc, pr, rc, rr, beta=0.1, nll_weight=0.2, n_chosen_tokens=18, n_pairs=4)
    assert abs(float(half) - float(loss) / 2) < 1e-6


def test_init_is_ln2_plus_nll(tiny):
    """policy == reference: every DPO term is exactly ln 2 and the total is ln 2 + 0.2 x NLL per chosen token."""
    fmt, _, model, _, sets = tiny
    _, batch = pairs_of(fmt, sets["preference"], n=4)
    B = batch["input_ids"].shape[0] // 2
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    pc, pr = full_logps(logits, batch["input_ids"], batch["chosen_mask"] + batch["rejected_mask"]).chunk(2)
    rc, rr = dpo.reference_logps(batch, ref_model=model)
    nll_sum, n_tok = -pc.sum(), batch["chosen_mask"][:B, 1:].sum()
    loss, losses, cr, rj = dpo_nll_loss(pc, pr, rc, rr, 0.1, 0.2, n_chosen_tokens=n_tok)
    assert torch.allclose(losses, torch.full_like(losses, LN2), atol=1e-6, rtol=0)
    assert torch.allclose(cr, torch.zeros_like(cr), atol=1e-7) and torch.allclose(rj, torch.zeros_like(rj), atol=1e-7)
    assert abs(loss.item() - (LN2 + 0.2 * (nll_sum / n_tok).item())) < 1e-5


def test_pairs_best_response_and_ids(tiny):
    """Ranked records train edited > rejected; sampling ids are used as ids; foreign prompt ids are skipped."""
    fmt, *_ = tiny
    prompt = [{"role": "user", "content": "Repeat the word river 2 times."}]
    ranked = {"prompt": prompt, "edited": [{"role": "assistant", "content": "river river"}],
              "chosen": [{"role": "assistant", "content": "Sure! Here it is: river river"}],
              "rejected": [{"role": "assistant", "content": "river"}]}
    comp = fmt.text_ids("river river") + [fmt.eot_id]
    sampled = {"prompt": prompt, "prompt_ids": fmt.encode_prompt(prompt), "chosen_ids": comp,
               "rejected_ids": fmt.text_ids("river"), "chosen": ranked["edited"], "rejected": ranked["rejected"]}
    bad = {**sampled, "prompt_ids": [fmt.bos_id] + sampled["prompt_ids"]}  # a double BOS: another template
    pairs, counts = dpo.build_pairs([ranked, sampled, bad], fmt, 256)
    assert counts["pairs"] == 2 and counts["from_edited"] == 1 and counts["skipped_prompt_ids_mismatch"] == 1
    (c0, r0), (c1, r1) = pairs
    assert c0.input_ids == fmt.encode_preference(prompt, ranked["edited"]).input_ids
    assert c1.input_ids[c1.prompt_len:] == comp and r1.input_ids[r1.prompt_len:] == fmt.text_ids("river")
    # cut-off rejected completion (no eot): all its tokens count; the chosen eot is masked
    assert c1.completion_mask(True)[-1] == 0 and c1.completion_mask(False)[-1] == 1
    assert sum(r1.completion_mask(True)) == len(fmt.text_ids("river"))


@pytest.mark.parametrize("mask,nll_mask", [(True, True), (True, False), (False, True)])
def test_formatting_tokens_get_no_gradient(tiny, mask, nll_mask):
    """With mask_special_tokens, BOS/header/role/\\n\\n/eot/pad positions and the prompt contribute exactly 0
    to loss and gradient (of chosen and rejected); with it off, the eot of the completions is trained; with
    nll_mask_special_tokens off, the chosen eot is trained by the NLL term only (never the rejected one's)."""
    fmt, _, _, _, sets = tiny
    pairs, _ = dpo.build_pairs(sets["preference"][:3], fmt, 256)
    batch = dpo.collate_pairs(pairs, fmt.pad_id, mask, nll_mask)
    ids, lm = batch["input_ids"], batch["chosen_mask"] + batch["rejected_mask"]
    B = len(pairs)
    assert not batch["chosen_mask"][B:].any() and not batch["rejected_mask"][:B].any() and not batch["nll_mask"][B:].any()
    # what the DPO term sees: exactly the completion's non-formatting tokens (+ eot when mask is off)
    for row, enc in enumerate([c for c, _ in pairs] + [r for _, r in pairs]):
        for t, tok in enumerate(enc.input_ids):
            want = t >= enc.prompt_len and (tok not in fmt.formatting_ids or (not mask and tok == fmt.eot_id))
            assert lm[row, t] == int(want), (row, t, tok)
    eot_trained = not (mask and nll_mask)
    assert torch.equal(batch["nll_mask"][:B], lm[:B]) == (not mask or nll_mask)
    torch.manual_seed(0)
    logits = torch.randn(*ids.shape, 40, requires_grad=True)
    ids_small = ids % 40  # a 40-token toy vocabulary keeps it small; masks are what is tested
    batch = {**batch, "input_ids": ids_small}
    ref = torch.randn(2, B)

    def total(lg):  # the stage's own code path, on given logits (at the positions it asks for)
        pc, pr, pc_nll = dpo.pair_logps(lambda logits_to_keep, **_: SimpleNamespace(logits=lg[:, logits_to_keep]), batch, nll=True)
        n = batch["nll_mask"][:, 1:].sum()
        return dpo_nll_loss(pc, pr, ref[0], ref[1], 0.1, 0.2, n_chosen_tokens=n, chosen_nll_logps=pc_nll)[0]

    total(logits).backward()
    counted = lm.bool() | batch["nll_mask"].bool()
    scored = torch.zeros_like(counted)
    scored[:, :-1] = counted[:, 1:]  # position t scores token t + 1
    assert (logits.grad[~scored] == 0).all()
    assert (logits.grad[scored].abs().sum(-1) > 0).all()
    eot_at = [len(c) - 2 for c, _ in pairs] + [len(r) - 2 for _, r in pairs]  # scores each response's eot
    for row, t in enumerate(eot_at):
        assert ids[row, t + 1] == fmt.eot_id
        assert (logits.grad[row, t].abs().sum() > 0) == (not mask or (row < B and eot_trained)), row
    with torch.no_grad():  # changing logits at masked positions changes nothing
        noisy = logits + 100.0 * torch.randn_like(logits) * (~scored).unsqueeze(-1)
        assert torch.equal(total(noisy), total(logits))


def test_matches_trl_sigmoid_plus_sft(tiny, tmp_path):
    """mask_special_tokens off == TRL 1.16 DPOTrainer, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.2].

    TRL tokenises the same records with the tokenizer's chat template (the ids must equal ours), collates them
    ([chosen; rejected], completion mask = the completion incl. eot) and its `compute_loss` gives
    mean(-log s(beta * delta)) + 0.2 * mean over the batch's chosen completion tokens of -log p. Its "sft"
    term is normalised per micro-batch, ours per optimizer step; with one micro-batch (no accumulation) on
    one process these coincide, which is the setting compared here. The reference is a different model, so
    the DPO term is not ln 2."""
    fmt, _, model, other, sets = tiny
    from datasets import Dataset
    from trl import DPOConfig as TRLConfig, DPOTrainer

    rows = [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in sets["preference"][:4]]
    pairs, batch = pairs_of(fmt, rows, mask=False)
    cfg = DPOConfig(beta=0.1, nll_weight=0.2, mask_special_tokens=False)
    with torch.no_grad():
        pc, pr = dpo.pair_logps(model, batch)
        rc, rr = dpo.reference_logps(batch, ref_model=other)
        n_tok = batch["chosen_mask"][:, 1:].sum()
        ours = float(dpo_nll_loss(pc, pr, rc, rr, cfg.beta, cfg.nll_weight, n_chosen_tokens=n_tok)[0])

    args = TRLConfig(output_dir=str(tmp_path), loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.2], beta=0.1,
                     precompute_ref_log_probs=False, report_to="none", max_length=None, use_cpu=True,
                     per_device_train_batch_size=len(rows), bf16=False)
    # copies: TRL patches the models' forward (fused LM head), which must not leak into the other tests
    trainer = DPOTrainer(model=copy.deepcopy(model), ref_model=copy.deepcopy(other), args=args,
                         train_dataset=Dataset.from_list(rows), processing_class=fmt.tokenizer)
    ds = trainer.train_dataset
    for i, (c, r) in enumerate(pairs):
        assert ds[i]["prompt_ids"] == c.input_ids[: c.prompt_len]
        assert ds[i]["chosen_ids"] == c.input_ids[c.prompt_len:] and ds[i]["rejected_ids"] == r.input_ids[r.prompt_len:]
    tb = trainer.data_collator([ds[i] for i in range(len(rows))])
    assert torch.equal(tb["input_ids"], batch["input_ids"])
    assert torch.equal(tb["completion_mask"], batch["chosen_mask"] + batch["rejected_mask"])
    with torch.no_grad():
        theirs = float(trainer.compute_loss(trainer.model, tb))
    assert abs(ours - LN2 - 0.2 * float(-pc.sum() / n_tok)) > 1e-3  # a real DPO term, not ln 2
    assert abs(ours - theirs) < 1e-5, (ours, theirs)


@pytest.mark.parametrize("nll_mask", [True, False])
def test_grad_accum_equals_one_batch(tiny, nll_mask):
    """Batch 4 x 1 micro-step == batch 1 x 4 micro-steps (variable lengths): same loss, NLL and gradients."""
    from accelerate import Accelerator

    fmt, _, model, other, sets = tiny
    cfg = DPOConfig(nll_mask_special_tokens=nll_mask)
    recs = sorted(sets["preference"], key=lambda r: len(r["chosen"][0]["content"]))
    recs = [recs[0], recs[-1], recs[len(recs) // 2], recs[1]]  # different lengths, so padding differs
    pairs, _ = dpo.build_pairs(recs, fmt, 256)
    assert len({len(c) for c, _ in pairs}) > 1
    acc = Accelerator(cpu=True)

    def micro(chunks):
        out = []
        for ch in chunks:
            mb = dpo.collate_pairs(ch, fmt.pad_id, cfg.mask_special_tokens, cfg.nll_mask_special_tokens)
            mb["ref_chosen"], mb["ref_rejected"] = dpo.reference_logps(mb, ref_model=other)
            out.append(mb)
        return out

    results = []
    for chunks in ([pairs], [[p] for p in pairs]):
        model.zero_grad(set_to_none=True)
        stats = dpo.dpo_step(model, micro(chunks), cfg, acc, 1)
        results.append((stats, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (s1, g1), (s4, g4) = results
    for k in dpo.METRICS:
        assert abs(s1[k] - s4[k]) < 1e-5, k
    assert s1["tokens"] == s4["tokens"] and s1["pairs"] == 4
    for n in g1:
        assert torch.allclose(g1[n], g4[n], atol=1e-6, rtol=1e-4), n
    model.zero_grad(set_to_none=True)


def test_lora_reference_is_base_with_adapters_disabled(tiny):
    fmt, _, model, _, sets = tiny
    _, batch = pairs_of(fmt, sets["preference"], n=2)
    with torch.no_grad():
        base = dpo.pair_logps(model, batch)
    peft = dpo.models.apply_lora(copy.deepcopy(model), LoraConfig(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_()  # a trained adapter
        trained = dpo.pair_logps(peft, batch)
    peft.train()
    ref = dpo.reference_logps(batch, policy=peft)
    assert peft.training and all(torch.allclose(a, b, atol=1e-5) for a, b in zip(ref, base))
    assert not torch.allclose(trained[0], base[0], atol=1e-3)


# -- the stage ------------------------------------------------------------------------------------------------
def _write(path: Path, recs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def test_main_smoke_on_the_fly_reference(tiny, tmp_path, monkeypatch):
    """A few steps of main: every parameter changes, the frozen reference does not, step 0 is ln 2."""
    fmt, model_dir, _, _, sets = tiny
    refs = []
    real = dpo.load_reference
    monkeypatch.setattr(dpo, "load_reference", lambda *a: refs.append(real(*a)) or refs[-1])
    recipe = load_recipe(None, ["dpo.lr=3e-3", "dpo.max_steps=3", "dpo.batch_size=4", "dpo.grad_accum=2", "dpo.log_every=1",
                                "dpo.precompute_ref=false", "dpo.report_to=none", "dpo.max_length=128",
                                "eval.max_new_tokens=8", "eval.samples_per_prompt=1", "eval.batch_size=8"])
    inputs = {"model": model_dir, "data": _write(tmp_path / "pref.jsonl", sets["preference"]),
              "eval_prompts": _write(tmp_path / "eval.jsonl", sets["eval_prompts"])}
    out = tmp_path / "dpo"
    metrics = dpo.main(recipe, out, inputs)

    for k in (*dpo.METRICS, "gold_score", "pass_rate", "mean_length"):
        assert k in metrics, k
    assert metrics["steps"] == 3 and metrics["pairs"]["pairs"] == metrics["data"]["n_kept"] > 20
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 3 and abs(log[0]["train/dpo"] - LN2) < 1e-5 and log[0]["train/rewards/margins"] == 0
    assert abs(log[0]["train/loss"] - LN2 - 0.2 * log[0]["train/nll"]) < 1e-5

    init = dpo.models.load_causal_lm(model_dir).state_dict()
    trained = dpo.models.load_causal_lm(out / "model").state_dict()
    unchanged = [n for n in init if torch.equal(init[n], trained[n])]
    assert not unchanged, unchanged
    (ref,) = refs
    assert not ref.training and not any(p.requires_grad for p in ref.parameters())
    assert all(torch.equal(v, init[n]) for n, v in ref.state_dict().items())
    assert not (out / "checkpoints").exists()


@pytest.mark.parametrize("precompute", [True, False])
def test_main_bf16_recipe(tiny, tmp_path, precompute):
    """A bf16 recipe: the policy trains float32 masters under bf16 autocast against a bf16 reference (the same
    bf16 matmuls at step 0: ln 2 to 1e-5), and is saved in bf16."""
    fmt, model_dir, _, _, sets = tiny
    bf16 = tmp_path / "bf16"
    dpo.models.load_causal_lm(model_dir, "bfloat16").save_pretrained(bf16, safe_serialization=True)
    fmt.tokenizer.save_pretrained(bf16)
    recipe = load_recipe(None, ["model.dtype=bfloat16", "dpo.lr=1e-4", "dpo.max_steps=2", "dpo.batch_size=6",
                                "dpo.log_every=1", "dpo.report_to=none", "dpo.max_length=128",
                                f"dpo.precompute_ref={str(precompute).lower()}"])
    out = tmp_path / "dpo"
    dpo.main(recipe, out, {"model": bf16, "data": _write(tmp_path / "pref.jsonl", sets["preference"])})
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert abs(log[0]["train/dpo"] - LN2) < 1e-5 and abs(log[0]["train/rewards/margins"]) < 1e-4
    from safetensors.torch import load_file

    assert {v.dtype for v in load_file(out / "model" / "model.safetensors").values()} == {torch.bfloat16}
    assert json.loads((out / "model" / "config.json").read_text())["dtype"] == "bfloat16"


def test_main_lora_precomputed_reference(tiny, tmp_path):
    """LoRA + precomputed reference (base with adapters disabled), NLL with eot: step 0 is ln 2 + 0.2 x NLL and
    the merged model moved in the LoRA targets only."""
    fmt, model_dir, _, _, sets = tiny
    recipe = load_recipe(None, ["dpo.lr=1e-2", "dpo.max_steps=2", "dpo.batch_size=6", "dpo.log_every=1",
                                "dpo.report_to=none", "dpo.max_length=128", "dpo.lora.r=4", "dpo.lora.alpha=8",
                                "dpo.lora.dropout=0.0", "dpo.save_every=1",
                                "dpo.nll_mask_special_tokens=false"])
    out = tmp_path / "dpo"
    metrics = dpo.main(recipe, out, {"model": model_dir, "data": _write(tmp_path / "pref.jsonl", sets["preference"])})
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert abs(log[0]["train/dpo"] - LN2) < 1e-5 and metrics["steps"] == 2
    assert abs(log[0]["train/loss"] - LN2 - 0.2 * log[0]["train/nll"]) < 1e-5
    init = dpo.models.load_causal_lm(model_dir).state_dict()
    trained = dpo.models.load_causal_lm(out / "model").state_dict()
    assert not torch.equal(init["model.layers.0.self_attn.q_proj.weight"], trained["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(init["model.embed_tokens.weight"], trained["model.embed_tokens.weight"])  # not a LoRA target


def test_main_resumes_after_a_kill(tiny, tmp_path, monkeypatch):
    """Killed right after the step-1 checkpoint, a rerun resumes there (reference log-probs from the cache)
    and ends with the same weights as an uninterrupted run."""
    fmt, model_dir, _, _, sets = tiny
    data = _write(tmp_path / "pref.jsonl", sets["preference"])
    overrides = ["dpo.lr=3e-3", "dpo.max_steps=3", "dpo.batch_size=6", "dpo.report_to=none", "dpo.max_length=128",
                 "dpo.save_every=1"]
    dpo.main(load_recipe(None, overrides), tmp_path / "full", {"model": model_dir, "data": data})

    kill_at_first_checkpoint(monkeypatch, dpo, lambda: dpo.main(load_recipe(None, overrides), tmp_path / "killed",
                                                                  {"model": model_dir, "data": data}))
    assert (tmp_path / "killed" / "checkpoints" / "ref_logps.pt").exists()
    monkeypatch.setattr(dpo, "precompute_reference", lambda *a, **k: pytest.fail("reference recomputed"))
    dpo.main(load_recipe(None, overrides), tmp_path / "killed", {"model": model_dir, "data": data})
    log = [json.loads(line)["step"] for line in (tmp_path / "killed" / "train_log.jsonl").read_text().splitlines()]
    assert log == [0, 2]  # log_every 10: step 0 by the killed run, the last step by the resumed one
    a = dpo.models.load_causal_lm(tmp_path / "full" / "model").state_dict()
    b = dpo.models.load_causal_lm(tmp_path / "killed" / "model").state_dict()
    assert all(torch.allclose(a[n], b[n], atol=1e-6) for n in a)
