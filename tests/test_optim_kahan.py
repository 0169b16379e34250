"""`master_weights: bf16_kahan`: core.optim.KahanAdamW (bf16 weights, bf16 moments, bf16 Kahan compensation).

Its math by hand against float64, that it follows float32 master weights where plain bf16 AdamW loses the
small updates, chunking, the state dict round trip, and an SFT run on the tiny model that trains in bf16."""

from __future__ import annotations

import io

import pytest
import torch

from core.config import ConfigError, load_recipe
from core.models import fp32_master_weights
from core.optim import KahanAdamW, make_optimizer

BETAS = (0.9, 0.95)  # the recipe's (make_optimizer)


class NoLauncher:
    class distributed_type:
        name = "NO"


def run(opt, params, grads):
    """One optimizer step per entry of `grads` (a list per step, one gradient per parameter)."""
    for step in grads:
        for p, g in zip(params, step):
            p.grad = g.to(p.dtype)
        opt.step()


def weights(opt, p):
    """What KahanAdamW's parameter stands for: the bf16 weight plus its compensation, in float32."""
    return p.detach().float() + opt.state[p]["compensation"].float()


def test_one_step_is_adamw_by_hand_in_float64():
    lr, wd, eps = 1e-3, 0.1, 1e-8
    torch.manual_seed(0)
    w = (torch.randn(3, 5) * 0.1).bfloat16()
    g = (torch.randn(3, 5) * 1e-2).bfloat16()
    p = torch.nn.Parameter(w.clone())
    opt = KahanAdamW([p], lr=lr, betas=BETAS, eps=eps, weight_decay=wd)
    run(opt, [p], [[g]])

    b1, b2 = BETAS
    g64 = g.double()
    m64, v64 = (1 - b1) * g64, (1 - b2) * g64**2
    w64 = w.double() * (1 - lr * wd) - lr * (m64 / (1 - b1)) / ((v64 / (1 - b2)).sqrt() + eps)

    state = opt.state[p]
    assert state["step"] == 1
    assert {state[k].dtype for k in ("exp_avg", "exp_avg_sq", "compensation")} == {torch.bfloat16}
    assert p.dtype == torch.bfloat16 and torch.equal(p.detach(), w64.to(torch.bfloat16))  # the nearest bf16
    torch.testing.assert_close(state["exp_avg"].double(), m64, rtol=2**-8, atol=0)
    torch.testing.assert_close(state["exp_avg_sq"].double(), v64, rtol=2**-8, atol=0)
    # p + compensation is the float64 weight to bf16's rounding of the compensation (< half an ulp of p):
    # ~1e-3 of the update lr here; p alone is off by up to half an ulp of p (~2e-4 at 0.1)
    err = (weights(opt, p).double() - w64).abs().max().item()
    assert err < 1e-3 * lr, err
    assert (p.detach().double() - w64).abs().max().item() > 10 * err  # the compensation carries what p cannot


def test_small_updates_follow_float32_masters_where_plain_bf16_drifts():
    """lr 1e-5 on weights of ~1e-2 (half a bf16 ulp there is ~3e-5): 300 steps of fixed random gradients.
    float32 master weights with torch's AdamW are the reference; KahanAdamW (p + compensation) stays within
    1% of the reference's movement, plain torch AdamW on bf16 weights loses most of the movement."""
    lr, wd, n, steps = 1e-5, 0.1, 4096, 300
    gen = torch.Generator().manual_seed(0)
    w0 = (torch.randn(n, generator=gen) * 1e-2).bfloat16()
    drift = torch.randn(n, generator=gen)  # a steady direction, so the weights move ~lr a step
    grads = [[(drift + 0.5 * torch.randn(n, generator=gen)) * 1e-3] for _ in range(steps)]

    master = torch.nn.Parameter(w0.float())
    run(torch.optim.AdamW([master], lr=lr, betas=BETAS, weight_decay=wd), [master], grads)
    kahan = torch.nn.Parameter(w0.clone())
    kahan_opt = KahanAdamW([kahan], lr=lr, betas=BETAS, weight_decay=wd)
    run(kahan_opt, [kahan], grads)
    plain = torch.nn.Parameter(w0.clone())
    run(torch.optim.AdamW([plain], lr=lr, betas=BETAS, weight_decay=wd), [plain], grads)

    ref = master.detach()
    moved = (ref - w0.float()).abs().mean().item()  # ~0.7 x steps x lr
    kahan_err = (weights(kahan_opt, kahan) - ref).abs()
    plain_err = (plain.detach().float() - ref).abs()
    print(f"movement {moved:.3g}; Kahan - fp32 master: max {kahan_err.max():.3g} mean {kahan_err.mean():.3g}; "
          f"plain bf16 - fp32 master: max {plain_err.max():.3g} mean {plain_err.mean():.3g}")
    assert moved > 0.5 * steps * lr
    assert kahan.dtype == torch.bfloat16
    assert kahan_err.max().item() < 0.01 * moved
    assert (kahan.detach().float() - ref).abs().max().item() < 2**-13  # p itself: within an ulp of ~1e-2
    assert plain_err.mean().item() > 0.5 * moved  # the failure mode: most of the movement rounded away


def test_chunked_equals_unchunked():
    torch.manual_seed(1)
    shapes = [(37, 11), (5,)]
    init = [(torch.randn(s) * 0.05).bfloat16() for s in shapes] + [(torch.randn(11, 37) * 0.05).bfloat16().t()]
    grads = [[torch.randn(w.shape) * 1e-3 for w in init] for _ in range(6)]
    out = []
    for chunk in (16, 2**24):  # 16: the (37, 11) weight in 26 chunks, the last one short
        params = [torch.nn.Parameter(w.clone()) for w in init]  # the last one non-contiguous: one piece
        opt = KahanAdamW(params, lr=1e-4, betas=BETAS, weight_decay=0.1, chunk_size=chunk)
        run(opt, params, grads)
        out.append([(p.detach(), *(opt.state[p][k] for k in ("exp_avg", "exp_avg_sq", "compensation"))) for p in params])
    for a, b in zip(*out):
        for x, y in zip(a, b):
            assert torch.equal(x, y)
    assert out[0][0][3].abs().sum() > 0  # the compensation is in play


def test_state_dict_round_trip_continues_bit_identically():
    torch.manual_seed(2)
    init = [(torch.randn(8, 16) * 0.02).bfloat16(), (torch.randn(16) * 0.02).bfloat16()]
    grads = [[torch.randn(w.shape) * 1e-3 for w in init] for _ in range(10)]
    params = [torch.nn.Parameter(w.clone()) for w in init]
    opt = KahanAdamW(params, lr=1e-5, betas=BETAS, weight_decay=0.1)
    run(opt, params, grads[:5])

    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    fresh = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = KahanAdamW(fresh, lr=1e-5, betas=BETAS, weight_decay=0.1)
    resumed.load_state_dict(torch.load(buf, weights_only=True))

    run(opt, params, grads[5:])
    run(resumed, fresh, grads[5:])
    for p, q in zip(params, fresh):
        assert torch.equal(p.detach(), q.detach())
        assert resumed.state[q]["step"] == opt.state[p]["step"] == 10
        for k in ("exp_avg", "exp_avg_sq", "compensation"):
            assert resumed.state[q][k].dtype == torch.bfloat16
            assert torch.equal(opt.state[p][k], resumed.state[q][k])
    assert opt.state[params[0]]["compensation"].abs().sum() > 0  # a lost compensation would show


def test_recipe_key_picks_optimizer_and_keeps_bf16_weights():
    model = torch.nn.Linear(4, 4).to(torch.bfloat16)
    kahan = load_recipe(None, ["model.dtype=bfloat16", "sft.master_weights=bf16_kahan"]).sft
    assert fp32_master_weights(model, NoLauncher, kahan.master_weights) == 0
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    opt, _ = make_optimizer(model, kahan, total_steps=10)
    assert type(opt) is KahanAdamW and opt.defaults["betas"] == BETAS

    default = load_recipe(None, ["model.dtype=bfloat16"]).sft
    assert default.master_weights == "float32"
    assert fp32_master_weights(model, NoLauncher, default.master_weights) == 2
    assert type(make_optimizer(model, default, total_steps=10)[0]) is torch.optim.AdamW
    with pytest.raises(ConfigError, match="needs model.dtype: bfloat16"):
        load_recipe(None, ["model.dtype=float32", "dpo.master_weights=bf16_kahan"])


def test_sft_bf16_kahan_trains_in_bf16(tmp_path, bf16_sft_inputs, monkeypatch):
    """The SFT stage with `sft.master_weights=bf16_kahan`: the optimizer is KahanAdamW on bf16 weights (no
    float32 copy), the loss falls, every weight moves, the saved model is bf16 (a checkpoint is written
    midway, so accelerate saves the optimizer's state too)."""
    from alignment import sft
    from core import optim
    from safetensors.torch import load_file

    made = []
    real = optim.make_optimizer
    monkeypatch.setattr(optim, "make_optimizer", lambda *a, **k: made.append(real(*a, **k)) or made[-1])

    model_dir, _, before = bf16_sft_inputs(48)
    recipe = load_recipe(None, ["model.dtype=bfloat16", "sft.master_weights=bf16_kahan", "sft.lr=3e-3", "sft.max_steps=12",
                                "sft.batch_size=4", "sft.report_to=none", "sft.warmup_ratio=0", "sft.save_every=6"])
    metrics = sft.main(recipe, tmp_path / "out", {"model": model_dir, "data": tmp_path / "sft.jsonl"})

    (opt, _), = made
    inner = getattr(opt, "optimizer", opt)  # accelerate's AcceleratedOptimizer wraps it
    assert type(inner) is KahanAdamW
    params = [p for group in inner.param_groups for p in group["params"]]
    assert params and {p.dtype for p in params} == {torch.bfloat16}
    assert {inner.state[p]["compensation"].dtype for p in params} == {torch.bfloat16}
    assert metrics["final_loss"] < metrics["first_loss"] - 0.1, metrics
    after = load_file(tmp_path / "out" / "model" / "model.safetensors")
    assert {v.dtype for v in after.values()} == {torch.bfloat16}
    assert [k for k, v in before.items() if torch.equal(v, after[k])] == []


def test_compiled_update_equals_eager():
    """The fused update the optimizer uses on CUDA (torch.compile of kahan_update_; here inductor's CPU code)
    gives the eager update's weights, moments and compensation exactly: in particular the compensation, which
    a fused kernel that skipped the bf16 rounding (inductor's default folding of w.to(bf16).float()) zeroes."""
    from core.optim import _compiled_update, kahan_update_

    torch.manual_seed(0)
    n = 5000
    base = [torch.randn(n).mul(1e-2).bfloat16(), torch.randn(n).mul(1e-3).bfloat16(), torch.randn(n).mul(1e-4).bfloat16(),
            torch.rand(n).mul(1e-8).bfloat16(), torch.randn(n).mul(1e-5).bfloat16()]
    hp = torch.tensor([1 - 1e-5 * 0.1, 0.9, 0.95, 1e-8, 1e-5 / (1 - 0.9**3), (1 - 0.95**3) ** 0.5])
    eager, fused = [x.clone() for x in base], [x.clone() for x in base]
    kahan_update_(*eager, hp)
    _compiled_update()(*fused, hp)
    for name, a, b, before in zip(("weight", "grad", "m", "v", "compensation"), eager, fused, base):
        assert a.dtype == b.dtype == torch.bfloat16
        if name != "grad":
            assert not a.equal(before), name  # the update did write it
        assert torch.equal(a, b), name
    assert eager[4].abs().sum() > 0
