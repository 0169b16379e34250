"""Losses as pure tensor functions. Each one's math is in its docstring and hand-checked in tests/.

Shapes: B = batch, T = sequence length, V = vocabulary. Log-probabilities come from core.logps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


# -- DPO (Llama 3) ------------------------------------------------------------------------------------------
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
