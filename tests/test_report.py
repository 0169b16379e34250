"""The eval stage's figures by hand: correlation, win rates with ties, sequence log-probs and the KL estimate."""

import math

import pytest
import torch

from evals.report import completion_logps, pearson, win_rate
from tests.test_sft import tiny_lm


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


def test_completion_logps_at_exact_positions(tiny_fmt):
    """Summed log p of the completion tokens only (prompt excluded), padding-independent, float32."""
    model = tiny_lm(tiny_fmt).eval()
    prompt = [{"role": "user", "content": "what sound does a cat make?"}]
    short = {"prompt": prompt, "completion_ids": tiny_fmt.text_ids("meow") + [tiny_fmt.eot_id]}
    long = {"prompt": prompt, "completion_ids": tiny_fmt.text_ids("a cat says meow of course") + [tiny_fmt.eot_id]}
    got = completion_logps(model, tiny_fmt, [short, long])
    alone = completion_logps(model, tiny_fmt, [short])
    assert got[0] == pytest.approx(alone[0], abs=1e-4)  # right padding of the batch changes nothing

    enc = tiny_fmt.encode_completion(prompt, short["completion_ids"])
    ids = torch.tensor([enc.input_ids])
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0].float().log_softmax(-1)
    want = sum(logp[t - 1, enc.input_ids[t]].item() for t in range(enc.prompt_len, len(enc)))
    assert got[0] == pytest.approx(want, abs=1e-4)
    assert len(enc) - enc.prompt_len == len(short["completion_ids"])


def test_kl_estimate_is_zero_to_itself_and_positive_to_another(tiny_fmt):
    from evals.gold import generate

    prompts = [[{"role": "user", "content": f"what color is a {w}?"}] for w in ("banana", "frog", "sky")]
    p, q = tiny_lm(tiny_fmt, seed=0), tiny_lm(tiny_fmt, seed=1)
    with torch.no_grad():
        q.lm_head.weight.mul_(20.0)  # a peaked q: p's samples are unlikely under it
    comps = generate(p, tiny_fmt, prompts, max_new_tokens=6, temperature=1.0, batch_size=8, seed=0, n=4)
    resp = [{"prompt": pr, "completion_ids": c} for pr, cs in zip(prompts, comps) for c in cs]
    lp = completion_logps(p, tiny_fmt, resp)
    assert sum(a - b for a, b in zip(lp, completion_logps(p, tiny_fmt, resp))) == 0.0
    kl = sum(a - b for a, b in zip(lp, completion_logps(q, tiny_fmt, resp))) / len(resp)
    assert math.isfinite(kl) and kl > 0  # on samples of p, log p - log q averages to KL(p||q) > 0
