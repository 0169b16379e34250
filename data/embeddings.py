"""Untrained special-token embeddings: the one check (the doctor) and the one fix (the doctor's --fix, and
SFT, the reward model and DPO when they load the model they start from).

Llama 3 base models ship barely trained rows for the tokens their pretraining never saw: the chat format's
headers and <|eot_id|> (3.0 base), <|eom_id|> and <|python_tag|> (3.1 base), the reserved tokens. Their norm is
~0 where a trained row's is ~1. Fine-tuning through a ~0 row is slow and unstable, and a policy sampled with
an untrained stop token never stops. A row counts as untrained when its norm is below UNTRAINED_RATIO x the
median row norm of its matrix (input embeddings and, when not tied, the LM head); the fix sets it to the
mean row of that matrix, which puts the token where the model expects "some token" to be.

    rows = untrained_rows(weight, ids)                       # the check, on a [V, H] tensor
    fixed = reset_untrained_rows(model, ids)                 # the fix, on a loaded model (ids reset, sorted)
"""

from __future__ import annotations

from contextlib import nullcontext

UNTRAINED_RATIO = 1e-3  # a trained row's norm is within ~10x of the median; an untrained one ~1e-5 of it or 0
_CHUNK = 16384  # rows at a time: a 128k x 4096 bf16 matrix is never copied whole to float32


def row_norms(weight):
    """Float32 L2 norm of every row of a [V, H] tensor, chunked."""
    import torch

    return torch.cat([weight[i : i + _CHUNK].float().norm(dim=-1) for i in range(0, weight.shape[0], _CHUNK)])


def untrained_rows(weight, token_ids, norms=None) -> list[int]:
    """The ids of `token_ids` (those inside the matrix) whose row norm is below UNTRAINED_RATIO x the median
    row norm of `weight` ([V, H]); `norms` if already computed (row_norms)."""
    norms = row_norms(weight) if norms is None else norms
    floor = UNTRAINED_RATIO * float(norms.median())
    return sorted({int(t) for t in token_ids if 0 <= int(t) < norms.shape[0] and float(norms[int(t)]) < floor})


def mean_row(weight):
    """The mean row of a [V, H] tensor, in float32, chunked."""
    total = None
    for i in range(0, weight.shape[0], _CHUNK):
        part = weight[i : i + _CHUNK].float().sum(0)
        total = part if total is None else total + part
    return total / weight.shape[0]


def reset_untrained_rows(model, token_ids, gather=None) -> list[int]:
    """Set the untrained rows (untrained_rows) of `token_ids` in the model's input embeddings and LM head to
    that matrix's mean row. Returns the ids reset in either, sorted.

    `gather(params)`: a context manager that makes whole parameters visible and writes them back (DeepSpeed
    ZeRO-3: core.distributed.gathered); none needed otherwise."""
    import torch

    gather = gather or (lambda params: nullcontext())
    fixed: set[int] = set()
    with torch.no_grad():
        for emb in {model.get_input_embeddings(), model.get_output_embeddings()} - {None}:  # tied: one matrix
            with gather([emb.weight]):
                w = emb.weight
                rows = untrained_rows(w, token_ids)
                if rows:
                    w[rows] = mean_row(w).to(w.dtype)
                fixed.update(rows)
    return sorted(fixed)
