"""Losses as pure tensor functions. Each one's math is in its docstring and hand-checked in tests/.

Shapes: B = batch, T = sequence length, V = vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_logps(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Log-probability of each next token, in float32.

    logps[b, t] = log softmax(logits[b, t])[input_ids[b, t + 1]]

    logits: [B, T, V], input_ids: [B, T] -> logps: [B, T - 1] (position t scores token t + 1).
    """
    logits = logits[:, :-1].float()  # [B, T-1, V]
    targets = input_ids[:, 1:].unsqueeze(-1)  # [B, T-1, 1]
    return torch.gather(logits.log_softmax(-1), 2, targets).squeeze(-1)


def masked_nll_sum(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed negative log-likelihood over trained tokens, and how many there are.

    nll = - sum_{b,t} m[b, t+1] * log p(x[b, t+1] | x[b, <=t])

    loss_mask: [B, T], 1 where token t is a label (assistant content and its eot in SFT). The caller divides
    by the number of trained tokens of the whole optimizer step (all micro-batches, all processes), so that
    gradient accumulation gives the same gradient as one big batch.
    """
    logps = token_logps(logits, input_ids)  # [B, T-1]
    mask = loss_mask[:, 1:].float()  # [B, T-1]
    return -(logps * mask).sum(), mask.sum()


# -- DPO (Llama 3) ------------------------------------------------------------------------------------------
def sequence_logps(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed float32 log-probability of each sequence's trained tokens, and how many there are.

    logps[b] = sum_t m[b, t+1] * log p(x[b, t+1] | x[b, <=t]),   n[b] = sum_t m[b, t+1]

    logits: [B, T, V], input_ids: [B, T], loss_mask: [B, T] (1 where token t counts: the final assistant
    turn, formatting tokens removed for Llama 3 DPO) -> logps: [B], n: [B]. A masked position contributes
    exactly 0 to the value and to the gradient.
    """
    logps = token_logps(logits, input_ids)  # [B, T-1] float32
    mask = loss_mask[:, 1:].to(logps.dtype)  # [B, T-1]
    return (logps * mask).sum(-1), mask.sum(-1)


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
             ref_rejected_logps: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO (sigmoid) loss and implicit rewards (Rafailov et al., 2023).

    With pc, pr, rc, rr the summed completion log-probs of chosen/rejected under the policy/reference:
        chosen_reward   = beta * (pc - rc)
        rejected_reward = beta * (pr - rr)
        loss            = -log sigmoid(beta * ((pc - rc) - (pr - rr)))

    All inputs: [B] -> (losses [B], chosen_rewards [B], rejected_rewards [B]). The rewards are detached:
    they are for logging only. At initialisation (policy == reference) every loss is exactly ln 2.
    """
    chosen_logratios = policy_chosen_logps - ref_chosen_logps  # [B]
    rejected_logratios = policy_rejected_logps - ref_rejected_logps  # [B]
    losses = -F.logsigmoid(beta * (chosen_logratios - rejected_logratios))  # [B]
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def dpo_nll_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
                 ref_rejected_logps: torch.Tensor, beta: float, nll_weight: float, n_chosen_tokens: float | torch.Tensor,
                 n_pairs: float | None = None, chosen_nll_logps: torch.Tensor | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Llama 3's DPO objective: DPO averaged over pairs + nll_weight x NLL of the chosen responses per token.

        loss = sum_b dpo_b / n_pairs + nll_weight * (-sum_b pc_b) / n_chosen_tokens

    -pc_b is the chosen response's summed NLL over its trained tokens (same mask as the DPO term), so the
    NLL term is the mean per chosen token. `n_pairs` and `n_chosen_tokens` are the counts of the WHOLE
    optimizer step (all micro-batches, all processes; n_pairs defaults to this batch's B): summing this loss
    over the micro-batches of a step then gives exactly the loss (and gradient) of one big batch.
    `chosen_nll_logps` [B], if given, replaces pc in the NLL term (the chosen log-probs under another mask,
    e.g. with the eot kept; `n_chosen_tokens` then counts that mask's tokens).

    Inputs: [B] -> (loss [], dpo losses [B], chosen_rewards [B], rejected_rewards [B]).
    """
    losses, chosen_rewards, rejected_rewards = dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                                        ref_rejected_logps, beta)
    n_pairs = losses.numel() if n_pairs is None else n_pairs
    nll_logps = policy_chosen_logps if chosen_nll_logps is None else chosen_nll_logps
    nll = -nll_logps.sum() / max(1.0, float(n_chosen_tokens))
    return losses.sum() / max(1.0, float(n_pairs)) + nll_weight * nll, losses, chosen_rewards, rejected_rewards
