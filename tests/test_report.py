"""The eval stage's figures by hand: correlation, win rates with ties, sequence log-probs and the KL estimate."""

import math

import pytest
import torch

from evals.report import response_logps, pearson, win_rate


def test_pearson_by_hand():
    assert pearson([1, 2, 3], [2, 4, 6]) == 1.0
    assert pearson([1, 2, 3], [3, 2, 1]) == -1.0
    # x = 1,2,3,4, y = 1,3,2,4: sxy = 4, sxx = syy = 5 -> 0.8
    assert pearson([1, 2, 3, 4], [1, 3, 2, 4]) == 0.8
    assert pearson([1, 1, 1], [1, 2, 3]) is None  # constant side
    assert pearson([1, 2], [1, 2]) is None  # too few points


def test_win_rate_ties_count_half():
    mine = {("p1", 0): 1.0, ("p2", 0): 0.5, ("p3", 0): 0.0, ("p4", 0): 1.0}
    theirs = {("p1", 0): 0.0, ("p2", 0): 0.5, ("p3", 0): 1.0, ("p5", 0): 0.0}
    # p1 win, p2 tie, p3 loss; p4/p5 unpaired -> (1 + 0.5 + 0) / 3
    assert win_rate(mine, theirs) == round(1.5 / 3, 4)
    assert win_rate({"a": None}, {"a": 1.0}) is None


def test_response_logps_at_exact_positions(tiny_fmt, tiny_lm):
    """Summed log p of the completion tokens only (prompt excluded), padding-independent, float32."""
    model = tiny_lm(tiny_fmt).eval()
    prompt = [{"role": "user", "content": "what sound does a cat make?"}]
    short = {"prompt": prompt, "completion_ids": tiny_fmt.text_ids("meow") + [tiny_fmt.eot_id]}
    long = {"prompt": prompt, "completion_ids": tiny_fmt.text_ids("a cat says meow of course") + [tiny_fmt.eot_id]}
    got = response_logps(model, tiny_fmt, [short, long])
    alone = response_logps(model, tiny_fmt, [short])
    assert got[0] == pytest.approx(alone[0], abs=1e-4)  # right padding of the batch changes nothing

    enc = tiny_fmt.encode_completion(prompt, short["completion_ids"])
    ids = torch.tensor([enc.input_ids])
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0].float().log_softmax(-1)
    want = sum(logp[t - 1, enc.input_ids[t]].item() for t in range(enc.prompt_len, len(enc)))
    assert got[0] == pytest.approx(want, abs=1e-4)
    assert len(enc) - enc.prompt_len == len(short["completion_ids"])


def test_kl_estimate_matches_the_exact_kl(tiny_fmt, tiny_lm):
    """On one-token answers sampled from p, mean(log p - log q) estimates the exact KL(p || q) of the
    first-token distributions; against a separate copy of p it is exactly 0."""
    import copy

    from core.evaluate import generate

    prompts = [[{"role": "user", "content": f"what color is a {w}?"}] for w in ("banana", "frog", "sky")]
    p = tiny_lm(tiny_fmt, seed=0)
    q = copy.deepcopy(p)
    with torch.no_grad():
        p.lm_head.weight.mul_(40.0)  # peaked answers: a KL well above the estimate's noise
        q.lm_head.weight.mul_(10.0)
    comps = generate(p, tiny_fmt, prompts, max_new_tokens=1, temperature=1.0, batch_size=8, seed=0, n=400)
    resp = [{"prompt": pr, "completion_ids": c} for pr, cs in zip(prompts, comps) for c in cs]
    lp = response_logps(p, tiny_fmt, resp)
    assert response_logps(copy.deepcopy(p), tiny_fmt, resp) == lp  # another copy of p: KL exactly 0
    est = sum(a - b for a, b in zip(lp, response_logps(q, tiny_fmt, resp))) / len(resp)
    exact = 0.0
    with torch.no_grad():
        for pr in prompts:
            ids = torch.tensor([tiny_fmt.encode_prompt(pr)])
            lp_p = p(input_ids=ids).logits[0, -1].float().log_softmax(-1)
            lp_q = q(input_ids=ids).logits[0, -1].float().log_softmax(-1)
            exact += float((lp_p.exp() * (lp_p - lp_q)).sum()) / len(prompts)
    assert exact > 0.05
    assert est == pytest.approx(exact, rel=0.25)
