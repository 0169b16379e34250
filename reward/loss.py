"""The reward model's loss: Bradley-Terry over ranked pairs, as a pure tensor function.

Llama 3 uses Llama 2's ranking loss with the margin term removed. A preference row ranked
edited > chosen > rejected gives every ordered pair (edited, chosen), (edited, rejected), (chosen, rejected);
a plain pair gives one. Shapes: P = pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Rank of each response key of a preference record; 0 is best. The rank gap of a pair sets its default margin.
RANK = {"edited": 0, "chosen": 1, "rejected": 2}


def pair_margin(record: dict, better: str, worse: str, per_rank: float) -> float:
    """Llama 2's margin m for the pair (better, worse) of `record`, used only when `reward.margin` is on.

    m = record["margin"] when the record carries a number there (one margin for all its pairs; Llama 2 maps
    the rater's "significantly better" ... "negligibly better" to a discrete margin), otherwise
    m = per_rank * (rank(worse) - rank(better)) with ranks edited 0, chosen 1, rejected 2: a pair one rank
    apart gets `per_rank`, edited > rejected gets twice that."""
    m = record.get("margin")
    if isinstance(m, (int, float)) and not isinstance(m, bool):
        return float(m)
    return per_rank * (RANK[worse] - RANK[better])


def bradley_terry_loss_sum(r_better: torch.Tensor, r_worse: torch.Tensor, margin: torch.Tensor | None = None) -> torch.Tensor:
    """Summed Bradley-Terry loss over P pairs, in float32.

    loss = sum_p -log sigmoid(r_better[p] - r_worse[p] - m[p])

    with m = 0 when `margin` is None (Llama 3) and m = margin[p] otherwise (Llama 2). `-log sigmoid(x)` is
    computed as softplus(-x), which is exact for large |x|. An identical pair (x = 0) costs ln 2, and if
    both rewards are the same tensor its gradient is 0. The caller divides by the number of pairs of the
    whole optimizer step (all micro-batches, all processes), so that gradient accumulation equals one big
    batch; `bradley_terry_loss` is the mean for a single batch.

    r_better, r_worse, margin: [P] -> scalar.
    """
    x = r_better.float() - r_worse.float()  # [P]
    if margin is not None:
        x = x - margin.to(x)
    return F.softplus(-x).sum()


def bradley_terry_loss(r_better: torch.Tensor, r_worse: torch.Tensor, margin: torch.Tensor | None = None) -> torch.Tensor:
    """Mean Bradley-Terry loss over P pairs: bradley_terry_loss_sum / P."""
    return bradley_terry_loss_sum(r_better, r_worse, margin) / max(1, r_better.numel())
