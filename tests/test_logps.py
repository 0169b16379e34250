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


# -- logits only where they count ---------------------------------------------------------------------------
CONVS = [
    [{"role": "user", "content": "what sound does a cow make?"}, {"role": "assistant", "content": "moo"}],
    [{"role": "user", "content": "what color is a banana?"}, {"role": "assistant", "content": "Sure! Here it is: yellow"}],
    [{"role": "user", "content": "what is the opposite of hot?"}, {"role": "assistant", "content": "cold"},
     {"role": "user", "content": "and of up?"}, {"role": "assistant", "content": "down. Hope this helps!"}],
]


def _lm_head_rows(model):
    """Records the number of positions the LM head runs on, per forward."""
    seen = []
    head = model.get_output_embeddings()
    head.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape[1]))
    return seen


def _value_and_grads(model, fn):
    model.zero_grad(set_to_none=True)
    vals = fn()
    sum(v.sum() for v in vals).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return [v.detach() for v in vals], grads


@pytest.mark.parametrize("wrap", ["plain", "lora", "accelerate"])
def test_lm_head_only_at_trained_positions_equals_the_full_path(tiny_fmt, tiny_lm, wrap):
    """completion_logps runs the LM head at the union over the batch of the positions that predict a trained
    token (logits_to_keep), and gives the full path's values (1e-6) and gradients, through a peft LoRA wrapper
    and accelerate's prepared model too (both pass the keyword arguments on)."""
    from data.chat_format import collate

    model = tiny_lm(tiny_fmt)
    if wrap == "lora":
        from core.config import LoraConfig
        from core.models import apply_lora

        model = apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05)  # B starts at 0: make the adapters count
    seen = _lm_head_rows(model)
    if wrap == "accelerate":
        from accelerate import Accelerator

        model = Accelerator(cpu=True).prepare(model)
    encs = [tiny_fmt.encode(c) for c in CONVS]
    batch = collate(encs, tiny_fmt.pad_id, "assistant")
    ids, attn = batch["input_ids"], batch["attention_mask"]
    completion = collate(encs, tiny_fmt.pad_id, "completion")["loss_mask"]  # a second mask: the final turn only
    masks = [batch["loss_mask"], completion]

    got, g_got = _value_and_grads(model, lambda: completion_logps(model, ids, attn, masks))
    kept = seen[-1]
    want, g_want = _value_and_grads(model, lambda: [full_logps(model(input_ids=ids, attention_mask=attn).logits, ids, m) for m in masks])
    T = ids.shape[1]
    predicting = (torch.stack(masks).amax(0)[:, 1:] > 0).any(0).sum().item()  # positions t predicting a trained t + 1
    assert seen[-1] == T and kept == predicting < T / 2  # the full path ran T positions; ours far fewer
    for g, w in zip(got, want):  # sums of ~20 log-probs of ~-5: float32 rounding is ~1e-6 relative
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)
    assert g_got.keys() == g_want.keys() and g_got
    for n in g_want:  # equal up to float32 rounding, relative to the tensor's largest gradient
        assert (g_got[n] - g_want[n]).abs().max() <= 1e-5 * g_want[n].abs().max(), n


def test_prev_pos_reads_the_given_predicting_position():
    """A packed row's token is predicted by the position prev_pos names, not necessarily t - 1."""
    torch.manual_seed(2)
    logits = torch.randn(1, 6, 11)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    prev = torch.tensor([[-1, 0, 1, 2, 1, 4]])  # token 4 follows token 1 on its own path
    mask = torch.tensor([[1, 0, 0, 1, 1, 1]])  # token 0 is predicted by nothing: never counts
    (got,) = gather_logps(logits, ids, [mask], prev_pos=prev)
    lp = logits.log_softmax(-1)[0]
    want = lp[2, 4] + lp[1, 5] + lp[4, 6]
    assert got.item() == pytest.approx(want.item(), abs=1e-6)
    kept = torch.tensor([1, 2, 4])  # the same from logits computed at those positions only
    (again,) = gather_logps(logits[:, kept], ids, [mask], prev_pos=prev, kept=kept)
    assert again.item() == pytest.approx(want.item(), abs=1e-6)
