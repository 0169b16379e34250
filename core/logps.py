"""Completion log-probabilities: the one place the stages turn a model's output into log p(token).

SFT (its NLL), DPO (policy and reference), and the eval stage's KL all call `completion_logps`.

Only the positions some mask trains are log-softmaxed, in float32, `chunk` positions at a time: the
float32 [rows, T, V] tensor of a plain `logits.float().log_softmax(-1)` (GiBs at a 128k vocabulary) never
exists; the float32 memory is [chunk, V]. Prompt and pad positions cost nothing beyond the model's own
logits. Exact: equal to the full log-softmax (tests/test_logps.py).
"""

from __future__ import annotations

import torch

CHUNK = 2048  # positions log-softmaxed at once: chunk x V float32 (1 GiB at V = 128,256)


def gather_logps(logits: torch.Tensor, input_ids: torch.Tensor, masks: list[torch.Tensor],
                 chunk: int = CHUNK) -> list[torch.Tensor]:
    """Summed float32 log-probability of each row's masked tokens, one [B] tensor per mask.

        out[i][b] = sum_t masks[i][b, t] * log softmax(logits[b, t - 1])[input_ids[b, t]]

    logits: [B, T, V] (any float dtype), input_ids: [B, T], masks: each [B, T], 1 where token t counts (the
    first token, which nothing predicts, never does). A masked position contributes exactly 0 to the value
    and to the gradient.
    """
    union = torch.stack([m[:, 1:] for m in masks]).amax(0) > 0  # [B, T-1]: position t predicts token t+1
    rows, cols = union.nonzero(as_tuple=True)  # [N], [N]
    targets = input_ids[:, 1:][rows, cols]  # [N]
    vals = []
    for i in range(0, rows.numel(), chunk):
        lg = logits[rows[i : i + chunk], cols[i : i + chunk]].float()  # [n, V] float32
        vals.append(lg.log_softmax(-1).gather(1, targets[i : i + chunk, None]).squeeze(1))  # [n]
    vals = torch.cat(vals) if vals else logits.new_zeros(0, dtype=torch.float32)  # [N]
    out = []
    for m in masks:
        w = m[:, 1:][rows, cols].to(torch.float32)  # [N]
        out.append(torch.zeros(input_ids.shape[0], dtype=torch.float32, device=logits.device).index_add(0, rows, vals * w))
    return out


def completion_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, masks: list[torch.Tensor],
                     **model_kwargs) -> list[torch.Tensor]:
    """One forward pass of `model`, then `gather_logps`: per mask, each row's summed log-probs [B]."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, **model_kwargs).logits  # [B, T, V]
    return gather_logps(logits, input_ids, masks)
