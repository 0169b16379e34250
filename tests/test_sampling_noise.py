"""sampling/noise.py: the batched seeded noise (`sampling.seeded_noise: batched`). Its speed is measured on GPUs
(bench/sampling_speed.py); here, on the CPU, what makes it a faithful replacement for vLLM's per-request draws:
Exp(1) noise, a row's token independent of the batch around it, a rewound draw drawn again, unseeded rows left
to the default generator, and vLLM's sampler calling it once installed."""

from __future__ import annotations

import pytest
import torch

from core.config import ConfigError, load_recipe
from sampling import noise


class CudaLikeGenerator:
    """What the noise reads of a CUDA torch.Generator (a CPU one has no offset): its seed and Philox offset."""

    def __init__(self, seed: int):
        self.seed, self.offset = seed, 0

    def initial_seed(self) -> int:
        return self.seed

    def get_offset(self) -> int:
        return self.offset

    def set_offset(self, offset: int) -> None:
        self.offset = offset


def test_lowbias32_is_one_function_on_ints_and_tensors():
    xs = [0, 1, 2, 123456789, 2**31, 2**32 - 1]
    assert noise.lowbias32(torch.tensor(xs, dtype=torch.int64)).tolist() == [noise.lowbias32(x) for x in xs]

    def reference(x: int) -> int:  # Wellons' C code, uint32 arithmetic written out mod 2^32
        x ^= x >> 16
        x = (x * 0x7FEB352D) % 2**32
        x ^= x >> 15
        x = (x * 0x846CA68B) % 2**32
        return x ^ (x >> 16)

    assert [noise.lowbias32(x) for x in xs] == [reference(x) for x in xs]


def test_mul32_is_the_product_mod_2_32():
    for x in (0, 1, 0xFFFFFFFF, 0x12345678, 0x9E3779B9):
        for c in (0x7FEB352D, 0x846CA68B, noise.WEYL):
            assert noise._mul32(x, c) == (x * c) % 2**32
            assert int(noise._mul32(torch.tensor([x]), c)[0]) == (x * c) % 2**32


def test_keyed_exponential_is_exp1_positive_and_keyed():
    keys = torch.tensor([noise.row_key(seed, 0) for seed in range(32)], dtype=torch.int64)
    q = noise.keyed_exponential(keys, 4096)  # q: [32, 4096]
    assert q.dtype == torch.float32 and torch.isfinite(q).all() and (q > 0).all()  # q = 0 would make p / q = inf
    # Exp(1): mean 1, variance 1, P(q > 1) = e^-1; 131k draws: standard errors ~0.003
    assert abs(q.mean().item() - 1) < 0.02 and abs(q.var().item() - 1) < 0.04
    assert abs((q > 1).float().mean().item() - 0.3679) < 0.01
    assert torch.equal(q, noise.keyed_exponential(keys, 4096))  # a function of the keys alone
    # rows of different keys are unrelated: correlation near 0
    assert abs(torch.corrcoef(q[:2])[0, 1].item()) < 0.05
    # a row's noise is the same whatever rows stand beside it
    assert torch.equal(noise.keyed_exponential(keys[5:6], 4096)[0], q[5])


def test_row_keys_part_near_seeds_and_draws():
    keys = {noise.row_key(s, d) for s in range(200) for d in range(50)}
    assert len(keys) == 200 * 50  # no collisions among 10,000 neighbours


def test_a_rows_token_does_not_depend_on_the_batch():
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(6, 50), dim=-1)  # probs: [B, V]
    gens = {i: CudaLikeGenerator(1000 + i) for i in range(6)}
    batch = noise.random_sample(probs.clone(), gens)  # tokens: [B]
    for i in range(6):
        alone = noise.random_sample(probs[i:i + 1].clone(), {0: CudaLikeGenerator(1000 + i)})
        assert alone.item() == batch[i].item()
    # every draw moved its generator by one draw (4, as vLLM's rewind of a discarded sample assumes)
    assert all(g.get_offset() == noise.DRAW_OFFSET for g in gens.values())


def test_a_rewound_draw_is_drawn_again():
    """vLLM discards a partial prefill's sample and rewinds the generator by 4: the next draw must repeat it."""
    torch.manual_seed(1)
    probs = torch.softmax(torch.randn(1, 1000) * 0.1, dim=-1)  # near uniform: distinct draws differ
    g = CudaLikeGenerator(7)
    first = noise.random_sample(probs.clone(), {0: g}).item()
    g.set_offset(g.get_offset() - noise.DRAW_OFFSET)
    assert noise.random_sample(probs.clone(), {0: g}).item() == first
    draws = [noise.random_sample(probs.clone(), {0: g}).item() for _ in range(20)]
    assert len(set(draws)) > 15  # later draws move on


def test_tokens_follow_the_probabilities():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).repeat(4000, 1)  # 4,000 requests, one draw each
    gens = {i: CudaLikeGenerator(i) for i in range(4000)}
    counts = torch.bincount(noise.random_sample(probs.clone(), gens), minlength=4).float() / 4000
    assert torch.allclose(counts, probs[0], atol=0.025), counts  # standard errors <= 0.008


def test_unseeded_rows_take_the_default_generator():
    probs = torch.softmax(torch.randn(4, 30), dim=-1)
    torch.manual_seed(3)
    a = noise.random_sample(probs.clone(), {1: CudaLikeGenerator(5)})
    torch.manual_seed(3)
    b = noise.random_sample(probs.clone(), {1: CudaLikeGenerator(5)})
    assert torch.equal(a, b)
    seeded = noise.random_sample(probs[1:2].clone(), {0: CudaLikeGenerator(5)})
    assert a[1] == seeded[0]


@pytest.mark.vllm
def test_install_puts_it_under_vllms_sampler(monkeypatch):
    from vllm.v1.sample.ops import topk_topp_sampler as vllm_sampler

    monkeypatch.setattr(vllm_sampler, "random_sample", vllm_sampler.random_sample)  # restored after the test
    noise.install()
    assert vllm_sampler.random_sample is noise.random_sample
    sampler = vllm_sampler.TopKTopPSampler()
    logits = torch.randn(3, 40)
    probs = logits.softmax(dim=-1, dtype=torch.float32)
    # forward_native: the path vLLM's CUDA sampler takes whenever a request has its own generator
    tokens, _ = sampler.forward_native(logits.clone(), {i: CudaLikeGenerator(i) for i in range(3)}, None, None)
    assert torch.equal(tokens, noise.random_sample(probs, {i: CudaLikeGenerator(i) for i in range(3)}))


def test_batched_noise_needs_one_gpu_per_engine():
    with pytest.raises(ConfigError, match="seeded_noise: batched.*tensor_parallel: 1"):
        load_recipe(None, ["sampling.seeded_noise=batched", "sampling.tensor_parallel=2"])
    assert load_recipe(None, ["sampling.seeded_noise=batched"]).sampling.seeded_noise == "batched"
    with pytest.raises(ConfigError, match="seeded_noise"):
        load_recipe(None, ["sampling.seeded_noise=fast"])
