"""The mixture-of-experts variant: every block's SwiGLU becomes `experts` SwiGLUs of width `expert_d_ff` and a
router that sends each token to its `top_k` experts (Switch/GShard/Mixtral; parameter names as Qwen3-MoE's).

Routing: router logits in float32, softmax over the experts, the top_k kept and renormalised to sum to 1
(Mixtral's and Qwen3-MoE's gating). A token's experts and weights are a function of its own hidden state
alone, so with the default dropless routing (`capacity_factor` unset) a token's output does not depend on
which other tokens, rows or ranks share its forward pass: the layout-invariance rule of the objectives holds.
With a capacity, each expert takes at most ceil(capacity_factor x tokens x top_k / experts) of a forward
pass's token slots, the first in token order (a stable sort keeps that order), and a dropped slot adds
nothing (the residual carries the token): deterministic, but dependent on the micro-batch's other rows.

Dispatch is dropless sort/gather: the N x top_k slots are stably sorted by expert, each expert runs once on
its contiguous run of tokens, and the outputs go back to their slots and are summed per token in slot order
(no atomic adds, so CUDA gives the same sums every time). Reading the per-expert counts is one wait for the
device per block.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from dlmctl.spec import ModelShape
from dlmctl.spec.model import MoEShape

from .dense import SwiGLU, Transformer


def load_balancing_loss(probs: torch.Tensor, chosen: torch.Tensor, experts: int) -> torch.Tensor:
    """Switch Transformer's auxiliary loss E * sum_i f_i P_i, minus 1. f_i is the share of the N x top_k token
    slots routed to expert i (sums to 1; no gradient), P_i the router's mean probability for expert i. When
    either is uniform the product is exactly 1 (E * sum_i f_i / E), its value at balance, so this returns 0
    there and grows as routing collapses (E - 1 when every token picks one expert with probability 1).
    Only P_i carries gradient, pushing probability away from overloaded experts; since f follows the top_k of
    the same probabilities the value stays near or above 0 (it can dip slightly below when f and P disagree)."""
    share = torch.bincount(chosen.flatten(), minlength=experts).to(probs.dtype) / chosen.numel()
    return experts * (share * probs.mean(0)).sum() - 1


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE's z-loss: the mean squared log-partition of the router logits, keeping them small (stable in bf16)."""
    return torch.logsumexp(logits, -1).square().mean()


class MoEFeedForward(nn.Module):
    def __init__(self, d_model: int, moe: MoEShape):
        super().__init__()
        self.config = moe
        self.gate = nn.Linear(d_model, moe.experts, bias=False)  # the router
        self.experts = nn.ModuleList(SwiGLU(d_model, moe.expert_d_ff) for _ in range(moe.experts))
        self.balance_loss: torch.Tensor | None = None  # of the last forward pass, for auxiliary_loss()
        self.z_loss: torch.Tensor | None = None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, d] -> (router logits [N, E] float32, probabilities [N, E], top_k experts [N, k], their weights)."""
        logits = self.gate(x).float()
        probs = logits.softmax(-1)
        weights, chosen = probs.topk(self.config.top_k, dim=-1)
        return logits, probs, chosen, weights / weights.sum(-1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, (experts, k) = x.shape, (self.config.experts, self.config.top_k)
        x = x.reshape(-1, shape[-1])
        logits, probs, chosen, weights = self.route(x)
        self.balance_loss, self.z_loss = load_balancing_loss(probs, chosen, experts), router_z_loss(logits)
        slot_expert = chosen.flatten()  # slot s = (token s // k, its (s % k)-th expert)
        order = slot_expert.argsort(stable=True)
        counts = torch.bincount(slot_expert, minlength=experts)
        if self.config.capacity_factor is not None:
            first_slot = counts.cumsum(0) - counts
            place = torch.arange(len(order), device=x.device) - first_slot[slot_expert[order]]
            order = order[place < self.config.capacity(x.shape[0])]
            counts = counts.clamp(max=self.config.capacity(x.shape[0]))
        runs = x[order // k].split(counts.tolist())
        outputs = torch.cat([expert(run) for expert, run in zip(self.experts, runs)])
        slots = x.new_zeros(len(slot_expert), x.shape[-1])
        slots[order] = outputs * weights.flatten()[order, None].to(outputs.dtype)
        return slots.view(-1, k, x.shape[-1]).sum(1).view(shape)


class MoETransformer(Transformer):
    """The backbone with a mixture of experts in every block. num_params counts every expert; active_params
    (hence flops_per_token and MFU) counts the top_k experts a token uses and the router."""

    @staticmethod
    def feed_forward(shape: ModelShape) -> nn.Module:
        return MoEFeedForward(shape.d_model, shape.moe)

    def moe_layers(self) -> list[MoEFeedForward]:
        return [m for m in self.modules() if isinstance(m, MoEFeedForward)]  # also inside checkpoint wrappers

    def auxiliary_loss(self) -> tuple[torch.Tensor, dict]:
        """aux_loss_coef x the load-balancing loss + z_loss_coef x the router z-loss, each the mean over the
        blocks (so a coefficient means the same at any depth), from the last forward pass."""
        layers = self.moe_layers()
        balance = torch.stack([m.balance_loss for m in layers]).mean()
        z = torch.stack([m.z_loss for m in layers]).mean()
        moe = self.shape.moe
        return moe.aux_loss_coef * balance + moe.z_loss_coef * z, {"balance_loss": balance.detach(),
                                                                    "router_z_loss": z.detach()}

    def active_params(self, exclude_embeddings: bool = False) -> int:
        moe = self.shape.moe
        per_expert = 3 * self.shape.d_model * moe.expert_d_ff
        return self.num_params(exclude_embeddings) - self.shape.n_layer * (moe.experts - moe.top_k) * per_expert
