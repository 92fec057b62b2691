"""Post-training maths: per-sequence log-probabilities of answers and the DPO loss.

`sequence_logps` sums log p(token) over the labelled positions of each row (the answer tokens),
from the final hidden states and the lm_head weight, a chunk of labelled positions at a time; with
gradients on, each chunk's logits are recomputed in backward instead of stored, so memory holds one
chunk of vocabulary-sized logits, not every answer token's.

`dpo_loss` is the loss of Rafailov et al. (2023), "Direct Preference Optimization":

    L = −log σ(β · [(log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x))])

per pair, with the implicit rewards r = β · (log π − log π_ref) of the chosen (w) and rejected (l)
answers reported beside it.

What this module does not do: run the model body, tokenize, or batch pairs (`famex.posttrain.dpo`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def _token_logps(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight, bias).float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def sequence_logps(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, bias: torch.Tensor | None = None,
                   chunk_tokens: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ log p(label) over each row's labelled positions, and the number of those positions.

    Args:
        hidden: [B, T, d] final hidden states (after the last norm).
        weight: [V, d] lm_head weight (``bias``: its [V] bias, if any).
        labels: [B, T] already shifted: ``labels[b, t]`` is the token position t predicts, or -100.
        chunk_tokens: labelled positions per lm_head chunk.

    Returns:
        logps: float32 [B] (differentiable), counts: int64 [B].
    """
    sel = labels != IGNORE_INDEX
    rows = sel.nonzero(as_tuple=True)[0]
    h = hidden[sel]
    targets = labels[sel]
    parts = []
    for i in range(0, h.shape[0], max(1, chunk_tokens)):
        hc, tc = h[i: i + chunk_tokens], targets[i: i + chunk_tokens]
        if torch.is_grad_enabled() and (hc.requires_grad or weight.requires_grad):
            parts.append(checkpoint(_token_logps, hc, weight, bias, tc, use_reentrant=False))
        else:
            parts.append(_token_logps(hc, weight, bias, tc))
    token_lp = torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)
    logps = torch.zeros(labels.shape[0], dtype=torch.float32, device=hidden.device).index_add(0, rows, token_lp)
    return logps, sel.sum(-1)


@dataclass
class DpoOut:
    """Per-pair DPO quantities (all [P])."""

    losses: torch.Tensor
    """−log σ(β · (Δ_policy − Δ_reference)): differentiable through the policy log-probs."""
    chosen_rewards: torch.Tensor
    """β · (log π(y_w|x) − log π_ref(y_w|x)), detached."""
    rejected_rewards: torch.Tensor
    """β · (log π(y_l|x) − log π_ref(y_l|x)), detached."""

    @property
    def margins(self) -> torch.Tensor:
        """Implicit reward margin of each pair (chosen minus rejected)."""
        return self.chosen_rewards - self.rejected_rewards


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> DpoOut:
    """The DPO loss of each pair from sequence log-probabilities (all [P]); ``beta`` > 0 is the KL strength."""
    if not beta > 0:
        from famex.errors import FamexError

        raise FamexError(f"DPO beta must be > 0, got {beta}")
    chosen = policy_chosen - ref_chosen
    rejected = policy_rejected - ref_rejected
    # logsigmoid is the stable form of log(1 / (1 + exp(−x))).
    losses = -F.logsigmoid(beta * (chosen - rejected))
    return DpoOut(losses, (beta * chosen).detach(), (beta * rejected).detach())
