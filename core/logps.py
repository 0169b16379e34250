"""Completion log-probabilities: the one place the stages turn a model's output into log p(token).

SFT (its NLL), DPO (policy and reference), and the eval stage's KL all call `completion_logps`.

Logits only where they count: the model's LM head runs only at the positions that predict a token some mask
trains (transformers' `logits_to_keep`, given the union of those positions over the batch), so its output is
[B, K, V], not [B, T, V]: prompt, pad and formatting positions cost no [V]-wide row, no float32 copy and no
gradient of one (at V = 128,256 the full logits and their gradient are GiBs). Those positions are then
log-softmaxed in float32, `chunk` at a time: the float32 memory is [chunk, V]. Exact: equal to the full
log-softmax of every position (tests/test_logps.py).

Which position predicts token t is position t - 1 in a plain row; in a packed row (core/packing.py) it is
the token before t on its own sequence's path, `prev_pos[b, t]`: a response placed after another one is
predicted, at its first token, by the prompt's last token.
"""

from __future__ import annotations

import torch

CHUNK = 1024  # positions log-softmaxed at once: chunk x V float32 (0.5 GiB at V = 128,256)


def shifted(input_ids: torch.Tensor) -> torch.Tensor:
    """prev_pos of plain rows: position t - 1 predicts token t; nothing predicts the first. [B, T]"""
    B, T = input_ids.shape
    return (torch.arange(T, device=input_ids.device) - 1).expand(B, T)


def scored(masks: list[torch.Tensor], prev_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The tokens some mask counts (and something predicts): (rows [N], cols [N], their predicting positions [N])."""
    union = (torch.stack(masks).amax(0) > 0) & (prev_pos >= 0)  # [B, T]
    rows, cols = union.nonzero(as_tuple=True)  # [N], [N]
    return rows, cols, prev_pos[rows, cols]


def gather_logps(logits: torch.Tensor, input_ids: torch.Tensor, masks: list[torch.Tensor], chunk: int = CHUNK,
                 prev_pos: torch.Tensor | None = None, kept: torch.Tensor | None = None,
                 seq: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Summed float32 log-probability of each row's masked tokens, one [B] tensor per mask.

        out[i][b] = sum_t masks[i][b, t] * log softmax(logits[b, prev_pos[b, t]])[input_ids[b, t]]

    With `seq` ([B, T] long: the sequence each token belongs to, e.g. the pair of a packed DPO row) the sums
    are per sequence instead of per row: out[i][s] sums the masked tokens whose seq is s, [S] with S = max + 1.

    logits: [B, T, V] (any float dtype), or [B, K, V] at the sorted sequence positions `kept` [K] (the model
    ran with logits_to_keep=kept); input_ids: [B, T]; masks: each [B, T], 1 where token t counts; prev_pos:
    [B, T], default t - 1 (a token nothing predicts, prev -1, never counts). A masked position contributes
    exactly 0 to the value and to the gradient.
    """
    prev_pos = shifted(input_ids) if prev_pos is None else prev_pos
    rows, cols, src = scored(masks, prev_pos)  # [N] each
    if kept is not None:
        src = torch.searchsorted(kept, src)  # [N]: index into the kept positions
    targets = input_ids[rows, cols]  # [N]
    vals = []
    for i in range(0, rows.numel(), chunk):
        lg = logits[rows[i : i + chunk], src[i : i + chunk]].float()  # [n, V] float32
        vals.append(lg.log_softmax(-1).gather(1, targets[i : i + chunk, None]).squeeze(1))  # [n]
    vals = torch.cat(vals) if vals else logits.new_zeros(0, dtype=torch.float32)  # [N]
    owner, n = (rows, input_ids.shape[0]) if seq is None else (seq[rows, cols], int(seq.max()) + 1)  # [N]: whose sum
    out = []
    for m in masks:
        w = m[rows, cols].to(torch.float32)  # [N]
        out.append(torch.zeros(n, dtype=torch.float32, device=logits.device).index_add(0, owner, vals * w))
    return out


def completion_logps(model, input_ids: torch.Tensor, attention_mask, masks: list[torch.Tensor],
                     prev_pos: torch.Tensor | None = None, seq: torch.Tensor | None = None,
                     **model_kwargs) -> list[torch.Tensor]:
    """One forward pass of `model` with its LM head at the predicting positions only, then `gather_logps`:
    per mask, each row's summed log-probs [B].

    attention_mask: [B, T] (1 = real), [B, 1, T, T] additive or a FlexAttention BlockMask (packed rows), or None
    (packed documents: the mask comes from `position_ids`, in model_kwargs); prev_pos: [B, T], default t - 1;
    seq: per-sequence sums instead of per-row (gather_logps). `model` is a causal
    LM whose forward takes `logits_to_keep` (transformers' own, through peft, DDP, DeepSpeed and accelerate's
    wrappers, which pass keyword arguments on). No KV cache: a training forward needs none, and with one
    transformers would not read packed documents from the position ids."""
    prev_pos = shifted(input_ids) if prev_pos is None else prev_pos
    _, _, src = scored(masks, prev_pos)
    kept = torch.unique(src)  # [K], sorted: the union over the batch of positions whose logits are read
    logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=kept, use_cache=False,
                   **model_kwargs).logits  # [B, K, V]
    return gather_logps(logits, input_ids, masks, prev_pos=prev_pos, kept=kept, seq=seq)
