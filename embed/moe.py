"""A modality-aware mixture-of-experts FFN: shared experts + top-k routed experts.

Every real token goes through the shared expert(s) (DeepSeekMoE's always-on experts) and through the
`top_k` routed experts its router picks. Dropless: each expert runs on exactly the tokens routed to it
(a loop over the handful of experts, never over tokens). The Switch Transformer load-balancing loss
(Fedus et al. 2021, eq. 4) keeps experts in use. Two routings:

- "learned": one router over all experts sees the token's state and its modality type (a learned
  per-modality bias on the logits, LIMoE-style), so text and image tokens may prefer different
  experts; nothing forces them to, and `routing_usage` measures whether they do (on the tiny config
  they differ early in training and drift back together over long runs under the balancing loss).
- "grouped" (MoMa, Lin et al. 2024): the first half of the routed experts serve text tokens, the
  second half image tokens; each token is routed top-k within its group, balanced per group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

N_MODALITIES = 2  # TEXT = 0, IMAGE = 1 (embed.model)


def _ffn(width: int, hidden: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width), nn.Dropout(dropout))


@dataclass
class RoutingStats:
    """What one MoE layer's router did since the last `reset_routing`."""

    usage: torch.Tensor  # (2, E) float: top-k assignments of text (row 0) and image (row 1) tokens to each expert
    aux_losses: list[torch.Tensor]  # one load-balancing loss per training forward (with grad)


class ModalityMoE(nn.Module):
    """Shared + routed experts; `forward(x, keep, modality)` like a dense FFN over (B, S, D).

    Args:
        experts: routed experts E (each with `hidden` units, like the dense FFN).
        shared: always-on experts (0 for none).
        top_k: routed experts per token; their softmax probabilities are the gates (Switch/GShard,
            unnormalised so the task loss trains the router).
        grouped: route text tokens among the first E/2 experts and image tokens among the rest.
    """

    group_mask: torch.Tensor

    def __init__(self, width: int, hidden: int, experts: int, shared: int, top_k: int, dropout: float,
                 grouped: bool = False) -> None:
        super().__init__()
        group = experts // 2 if grouped else experts
        if grouped and experts % 2:
            raise ValueError(f"experts={experts} must be even to split into text and image groups")
        if not 1 <= top_k <= group:
            raise ValueError(f"top_k={top_k} must be in [1, {group}] ({experts} experts, grouped={grouped})")
        self.top_k = top_k
        self.grouped = grouped
        # grouped (MoMa, Lin et al. 2024): text tokens route among experts [0, E/2), image tokens among [E/2, E)
        mask = torch.zeros(N_MODALITIES, experts)
        if grouped:
            mask[0, group:], mask[1, :group] = float("-inf"), float("-inf")
        self.register_buffer("group_mask", mask, persistent=False)  # (2, E) added to the router logits
        self.shared = nn.ModuleList(_ffn(width, hidden, dropout) for _ in range(shared))
        self.experts = nn.ModuleList(_ffn(width, hidden, dropout) for _ in range(experts))
        self.router = nn.Linear(width, experts, bias=False)
        self.modality_bias = nn.Parameter(torch.zeros(N_MODALITIES, experts))  # (2, E) router prior per modality
        self.stats = RoutingStats(torch.zeros(N_MODALITIES, experts), [])

    def forward(self, x: torch.Tensor, keep: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        """(B, S, D) states, (B, S) keep-mask and modality ids -> (B, S, D); padding positions get zeros."""
        tokens, kinds = x[keep], modality[keep]  # (R, D), (R,): real tokens only
        logits = self.router(tokens).float() + self.modality_bias[kinds] + self.group_mask[kinds]  # (R, E)
        probs = logits.softmax(dim=-1)
        gates, chosen = probs.topk(self.top_k, dim=-1)  # (R, K)
        out = torch.zeros_like(tokens)
        for shared in self.shared:
            out = out + shared(tokens).to(out.dtype)
        for e, expert in enumerate(self.experts):
            # every expert runs (on zero rows when unused), so DDP always sees a gradient for it
            rows, slot = (chosen == e).nonzero(as_tuple=True)
            y = expert(tokens[rows]) * gates[rows, slot].unsqueeze(-1).to(tokens.dtype)
            out = out.index_add(0, rows, y.to(out.dtype))
        self._record(probs, chosen, kinds)
        return torch.zeros_like(x).masked_scatter(keep[..., None], out)

    def _record(self, probs: torch.Tensor, chosen: torch.Tensor, kinds: torch.Tensor) -> None:
        e = probs.shape[-1]
        with torch.no_grad():
            assigned = F.one_hot(chosen, e).sum(1).float()  # (R, E): 1 where routed
            usage = torch.zeros(N_MODALITIES, e, device=probs.device).index_add(0, kinds, assigned)
            self.stats.usage = self.stats.usage.to(probs.device) + usage
        if self.training and torch.is_grad_enabled() and len(probs):
            self.stats.aux_losses.append(self._balance(probs, chosen, kinds))

    def _balance(self, probs: torch.Tensor, chosen: torch.Tensor, kinds: torch.Tensor) -> torch.Tensor:
        """The load-balancing loss over all tokens; grouped, its mean over each modality within its group."""
        if not self.grouped:
            return load_balancing_loss(probs, chosen)
        group = probs.shape[-1] // 2
        losses = [load_balancing_loss(probs[kinds == m][:, m * group:(m + 1) * group], chosen[kinds == m] - m * group)
                  for m in range(N_MODALITIES) if bool((kinds == m).any())]
        return torch.stack(losses).mean()


def load_balancing_loss(probs: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """Switch Transformer auxiliary loss: E * sum_e f_e * P_e; 1.0 when routing is uniform.

    f_e is the fraction of the R*K assignments that went to expert e (no gradient), P_e the mean
    router probability of e over the R tokens.
    """
    e = probs.shape[-1]
    fraction = F.one_hot(chosen, e).float().mean(dim=(0, 1))  # (E,)
    return e * (fraction * probs.mean(0)).sum()


def moe_layers(module: nn.Module) -> list[ModalityMoE]:
    """The MoE layers inside `module` (none for a dense encoder)."""
    return [m for m in module.modules() if isinstance(m, ModalityMoE)]


def reset_routing(module: nn.Module) -> None:
    """Forget every MoE layer's usage counts and pending auxiliary losses."""
    for layer in moe_layers(module):
        layer.stats = RoutingStats(torch.zeros_like(layer.stats.usage), [])


def auxiliary_loss(module: nn.Module) -> torch.Tensor | None:
    """Sum over layers of the mean load-balancing loss of their training forwards; None without any."""
    per_layer = [torch.stack(layer.stats.aux_losses).mean() for layer in moe_layers(module) if layer.stats.aux_losses]
    return torch.stack(per_layer).sum() if per_layer else None


def routing_usage(module: nn.Module) -> torch.Tensor | None:
    """(layers, 2, E) share of each modality's top-k assignments that went to each expert; None if dense.

    Row 0 is text, row 1 image; a modality with no tokens since the last reset has a row of zeros.
    """
    layers = moe_layers(module)
    if not layers:
        return None
    usage = torch.stack([layer.stats.usage for layer in layers])  # (L, 2, E)
    return usage / usage.sum(-1, keepdim=True).clamp_min(1.0)


def routing_distance(usage: torch.Tensor) -> torch.Tensor:
    """(L,) total-variation distance between the text and image expert distributions of each layer."""
    return 0.5 * (usage[:, 0] - usage[:, 1]).abs().sum(-1)
