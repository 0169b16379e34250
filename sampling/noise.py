"""Seeded sampling noise for vLLM on GPUs, drawn for the whole batch at once (`sampling.seeded_noise: batched`).

The stage gives every request its own seed, so that the candidates do not depend on batching, sharding,
the backend or resumes. vLLM samples by the exponential race (Gumbel-max): token = argmax_v p_v / q_v with
q_v ~ Exp(1). For seeded requests it draws q one request at a time (`random_sample` in
vllm/v1/sample/ops/topk_topp_sampler.py: `for i, generator in generators.items(): q[i].exponential_(generator)`).
That is a kernel launch per sequence per decode step: with 1,024 sequences, about 34 ms of a step that needs
about 2 ms on an H200 (README, "Rejection sampling on Ray").

Here the noise of a row is a function of (its request's seed, its draw number) alone, computed for every seeded
row in one pass. It stays independent of the batch, as vLLM's own is:

    key_r      = mix32(seed_r, draw_r)                      (host, one per row; draw_r = generator offset / 4)
    x_{r,v}    = lowbias32(key_r + (v + 1) * 0x9E3779B9 mod 2^32)   (a Weyl sequence through a 32-bit hash)
    u_{r,v}    = ((x_{r,v} >> 9) + 0.5) / 2^23              (uniform on (0, 1), 23 bits: its largest value,
                                                              1 - 2^-24, still below 1 in float32, so q > 0)
    q_{r,v}    = -log(u_{r,v})                              (Exp(1))

The draw number lives in the request's own torch.Generator: each draw moves its offset by 4, the amount vLLM
rewinds when it discards a partial prefill's sample (`set_offset(get_offset() - 4)`), so a rewound draw is
drawn again with the same noise, as vLLM's would be. The ids differ from vLLM's per-request noise (another
generator), and are as reproducible. All arithmetic is on int64 holding 32-bit values, so no product overflows.

`install()` puts `random_sample` in vLLM's place in this process; sampling/engine.py calls it before it
starts an engine, and keeps the engine core in the same process so that the engine samples with it.
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
WEYL = 0x9E3779B9  # 2^32 / golden ratio
DRAW_OFFSET = 4  # what one draw moves a generator's offset by (vLLM rewinds a discarded draw by this)


def _mul32(x, c: int):
    """(x * c) mod 2^32 for x in [0, 2^32) (an int, or an int64 tensor) and a 32-bit constant c, in two 16-bit
    halves: no int64 product overflows."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + ((x * hi) & 0xFFFF) * 65536) & MASK32


def lowbias32(x):
    """A 32-bit integer hash with a low avalanche bias (C. Wellons' lowbias32), on ints or int64 tensors in
    [0, 2^32): the same function on the host (keys) and on the device (noise)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def row_key(seed: int, draw: int) -> int:
    """The 32-bit key of one row's draw: both numbers through the hash, so that nearby seeds and draws part."""
    return lowbias32((lowbias32((seed ^ (seed >> 32)) & MASK32) * 31 + lowbias32(draw & MASK32)) & MASK32)


def keyed_exponential(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """Exp(1) noise [rows, vocab] in float32 from int64 keys [rows] (values in [0, 2^32)), on keys' device."""
    v = torch.arange(1, vocab + 1, device=keys.device, dtype=torch.int64)  # v: [V]
    x = lowbias32((keys[:, None] + _mul32(v, WEYL)[None, :]) & MASK32)  # x: [R, V]
    u = ((x >> 9).to(torch.float32) + 0.5) * (1.0 / 2**23)  # < 1 in float32: q > 0, never a 0/0 in probs / q
    return -torch.log(u)


def draw_keys(generators: dict[int, torch.Generator]) -> list[int]:
    """One key per seeded row, in `generators`' order; each generator's offset moves on by one draw."""
    keys = []
    for g in generators.values():
        off = g.get_offset()
        keys.append(row_key(g.initial_seed(), off // DRAW_OFFSET))
        g.set_offset(off + DRAW_OFFSET)
    return keys


def random_sample(probs: torch.Tensor, generators: dict[int, torch.Generator], use_fp64_gumbel: bool = False) -> torch.Tensor:
    """vLLM's `random_sample`, with the seeded rows' noise drawn in one batch (keyed_exponential).

    probs: [B, V] float32; generators: row index -> that request's generator (seeded rows only). Unseeded rows
    take the device's default generator, as in vLLM."""
    from vllm.v1.sample.ops.topk_topp_sampler import empty_exponential_noise_like, sample_with_exponential_noise

    q = empty_exponential_noise_like(probs, use_fp64_gumbel)  # q: [B, V]
    if len(generators) != probs.shape[0]:
        q.exponential_()
    if generators:
        rows = torch.tensor(list(generators), dtype=torch.long, device=probs.device)
        keys = torch.tensor(draw_keys(generators), dtype=torch.int64).to(probs.device, non_blocking=True)
        q[rows] = _noise(keys, probs.shape[1]).to(q.dtype)
    return sample_with_exponential_noise(probs, q)


_compiled = None


def _noise(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    # on CUDA one fused kernel (inductor): eager, the ~20 elementwise ops would each read and write [R, V] int64
    global _compiled
    if keys.device.type != "cuda":
        return keyed_exponential(keys, vocab)
    if _compiled is None:
        _compiled = torch.compile(keyed_exponential, dynamic=True)
    return _compiled(keys, vocab)


def install() -> None:
    """Replace vLLM's `random_sample` in this process (its samplers look it up by name at each call)."""
    from vllm.v1.sample.ops import topk_topp_sampler

    topk_topp_sampler.random_sample = random_sample
