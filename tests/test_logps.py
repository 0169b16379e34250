"""core.logps: the chunked, masked-positions-only log-probs equal the plain full log-softmax."""

import pytest
import torch

from core.logps import completion_logps, gather_logps
from tests.conftest import full_logps


def test_gather_logps_equals_full_log_softmax_values_and_gradients():
    torch.manual_seed(0)
    B, T, V = 3, 9, 50
    logits = torch.randn(B, T, V, dtype=torch.float64).requires_grad_(True)
    ids = torch.randint(0, V, (B, T))
    m1 = torch.zeros(B, T, dtype=torch.long)
    m1[0, 4:] = 1
    m1[1, 2:6] = 1  # row 2 has no trained token: its sum is exactly 0
    m2 = torch.zeros_like(m1)
    m2[0, 8] = 1
    m2[2, 1:] = 1
    for chunk in (1, 4, 1000):  # the chunk size changes nothing
        got = gather_logps(logits, ids, [m1, m2], chunk=chunk)
        want = [full_logps(logits, ids, m) for m in (m1, m2)]
        for g, w in zip(got, want):
            assert g.dtype == torch.float32
            torch.testing.assert_close(g.double(), w.double(), rtol=1e-6, atol=1e-6)
    assert got[0][2].item() == 0.0
    g_got = torch.autograd.grad(sum(g.sum() for g in got), logits)[0]
    g_want = torch.autograd.grad(sum(full_logps(logits, ids, m).sum() for m in (m1, m2)), logits)[0]
    torch.testing.assert_close(g_got.float(), g_want.float(), rtol=1e-6, atol=1e-6)
    assert g_got[1].abs().sum() > 0 and g_got[:, 0].abs().sum() > 0  # masked in, gradient flows
    assert (g_got[1, 6:] == 0).all()  # position 6+ of row 1 predicts untrained tokens: zero gradient


def test_gather_logps_bf16_logits_in_float32():
    torch.manual_seed(1)
    logits = torch.randn(2, 5, 30).to(torch.bfloat16)
    ids = torch.randint(0, 30, (2, 5))
    mask = torch.ones(2, 5, dtype=torch.long)
    (got,) = gather_logps(logits, ids, [mask])
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, full_logps(logits, ids, mask), rtol=1e-6, atol=1e-6)


def test_completion_logps_runs_the_model_once(tiny_fmt, tiny_lm):
    model = tiny_lm(tiny_fmt).eval()
    enc = tiny_fmt.encode([{"role": "user", "content": "what color is a frog?"}, {"role": "assistant", "content": "green"}])
    ids = torch.tensor([enc.input_ids])
    mask = torch.tensor([enc.assistant_mask])
    with torch.no_grad():
        (got,) = completion_logps(model, ids, torch.ones_like(ids), [mask])
        want = full_logps(model(input_ids=ids).logits, ids, mask)
    assert got.item() == pytest.approx(want.item(), abs=1e-6)
