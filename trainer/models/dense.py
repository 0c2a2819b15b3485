"""The dense variant, and the backbone every variant shares: a decoder-only transformer (RMSNorm, RoPE,
SwiGLU, optional GQA and QK-norm, tied or untied embeddings). The diffusion and autoregressive arms run the
*same* module; the only difference is the `causal` flag handed to scaled_dot_product_attention.

A variant subclasses Transformer and replaces `feed_forward` (the block's MLP, chosen by the shape as
litgpt's config chooses its MLP class) and what follows from it: `flops_per_token`, `param_groups`,
`auxiliary_loss`. Parallelism and activation checkpointing are applied from outside (the engine wraps
`model.blocks`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from dlmctl.spec import ModelShape

INIT_STD = 0.02


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalized in float32 and cast back before the weight, as Llama does; one fused kernel.
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight


def rope_tables(max_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half RoPE (the Llama/litgpt layout) as two [max_len, 2, head_dim/2] tables: cos for both halves,
    and sin signed (-sin, +sin), so that the halves (x1, x2) rotate to (x1 cos - x2 sin, x2 cos + x1 sin)
    = x cos + swapped(x) sin. Built once in float32; the model's dtype casts them like its weights."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    cos, sin = angles.cos(), angles.sin()
    return torch.stack((cos, cos), 1), torch.stack((-sin, sin), 1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D] rotated by the tables' rows for its T positions, in x's dtype (no concatenation)."""
    halves = x.unflatten(-1, (2, -1))
    return (halves * cos + halves.flip(-2) * sin).flatten(-2)


@dataclass
class KVCache:
    """Pre-allocated keys and values for autoregressive decoding: [layer][B, n_kv_head, max_len, head_dim]."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @classmethod
    def empty(cls, shape: ModelShape, batch: int, max_len: int, device=None, dtype=torch.float32) -> "KVCache":
        size = (batch, shape.n_kv_head, max_len, shape.head_dim)
        return cls(
            [torch.zeros(size, device=device, dtype=dtype) for _ in range(shape.n_layer)],
            [torch.zeros(size, device=device, dtype=dtype) for _ in range(shape.n_layer)],
        )

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        end = start_pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; asked to write up to {end}")
        self.keys[layer][:, :, start_pos:end] = k
        self.values[layer][:, :, start_pos:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class Attention(nn.Module):
    def __init__(self, shape: ModelShape, layer: int):
        super().__init__()
        self.layer, self.n_head, self.n_kv_head, self.head_dim = layer, shape.n_head, shape.n_kv_head, shape.head_dim
        self.q_proj = nn.Linear(shape.d_model, shape.n_head * shape.head_dim, bias=False)
        self.k_proj = nn.Linear(shape.d_model, shape.n_kv_head * shape.head_dim, bias=False)
        self.v_proj = nn.Linear(shape.d_model, shape.n_kv_head * shape.head_dim, bias=False)
        self.o_proj = nn.Linear(shape.n_head * shape.head_dim, shape.d_model, bias=False)
        # QK-norm per head (Qwen3/OLMo-style), before RoPE.
        self.q_norm = RMSNorm(shape.head_dim, shape.norm_eps) if shape.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(shape.head_dim, shape.norm_eps) if shape.qk_norm else nn.Identity()
        self.attention_dropout = shape.attention_dropout

    def forward(self, x, cos, sin, causal: bool, kv_cache: KVCache | None = None, start_pos: int = 0,
                attn_mask: torch.Tensor | None = None):
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.n_head, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        mask, is_causal = attn_mask, causal and attn_mask is None  # a given mask already holds causality
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer, k, v, start_pos)
            if start_pos > 0:  # queries sit at start_pos..start_pos+T-1 and may see every key up to themselves
                is_causal = False
                if T > 1:
                    mask = torch.ones(T, k.shape[2], dtype=torch.bool, device=x.device).tril(diagonal=start_pos)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal,
            dropout_p=self.attention_dropout if self.training else 0.0,
            enable_gqa=self.n_kv_head != self.n_head,
        )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_ff, bias=False)
        self.up_proj = nn.Linear(d_model, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, shape: ModelShape, layer: int, mlp: nn.Module):
        super().__init__()
        self.attn_norm = RMSNorm(shape.d_model, shape.norm_eps)
        self.attn = Attention(shape, layer)
        self.mlp_norm = RMSNorm(shape.d_model, shape.norm_eps)
        self.mlp = mlp
        self.dropout = nn.Dropout(shape.dropout)

    def forward(self, x, cos, sin, causal: bool, kv_cache: KVCache | None = None, start_pos: int = 0,
                attn_mask: torch.Tensor | None = None):
        x = x + self.dropout(self.attn(self.attn_norm(x), cos, sin, causal, kv_cache, start_pos, attn_mask))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


class Transformer(nn.Module):
    def __init__(self, shape: ModelShape):
        super().__init__()
        self.shape = shape
        self.embed = nn.Embedding(shape.vocab_size, shape.d_model)
        self.dropout = nn.Dropout(shape.dropout)
        self.blocks = nn.ModuleList(Block(shape, i, self.feed_forward(shape)) for i in range(shape.n_layer))
        self.norm = RMSNorm(shape.d_model, shape.norm_eps)
        self.lm_head = nn.Linear(shape.d_model, shape.vocab_size, bias=False)
        if shape.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        cos, sin = rope_tables(shape.max_seq_len, shape.head_dim, shape.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)  # derived from the shape: not in checkpoints
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    @staticmethod
    def feed_forward(shape: ModelShape) -> nn.Module:
        """The block's MLP: one SwiGLU of width d_ff."""
        return SwiGLU(shape.d_model, shape.d_ff)

    def reset_parameters(self) -> None:
        """Normal(0, 0.02) weights; residual output projections scaled by 1/sqrt(2 n_layer) (GPT-2)."""
        residual_std = INIT_STD / math.sqrt(2 * self.shape.n_layer)
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                if module is self.lm_head and self.shape.tie_embeddings:
                    continue
                std = residual_std if name.endswith(("o_proj", "down_proj")) else INIT_STD
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def forward(self, idx: torch.Tensor, *, causal: bool, kv_cache: KVCache | None = None, start_pos: int = 0,
                lengths: torch.Tensor | None = None):
        """idx [B, T] -> logits [B, T, V]. causal=True for AR, False (bidirectional) for DLM.

        lengths [B] (key padding): row b's positions >= lengths[b] are hidden as attention keys, so its
        first lengths[b] outputs are those of the row cut to that length. Leave it None when no row is
        cut: only then can scaled_dot_product_attention use its unmasked (flash) kernels."""
        T = idx.shape[1]
        if start_pos + T > self.shape.max_seq_len:
            raise ValueError(f"sequence of {start_pos + T} tokens exceeds max_seq_len {self.shape.max_seq_len}")
        if kv_cache is not None and not causal:
            raise ValueError("a KV cache only applies to causal (autoregressive) decoding")
        if kv_cache is not None and lengths is not None:
            raise ValueError("lengths (key padding) does not combine with a KV cache")
        attn_mask = None
        if lengths is not None:
            keys = torch.arange(T, device=idx.device)
            attn_mask = (keys < lengths.to(idx.device)[:, None])[:, None, None, :]  # [B, 1, 1, T]
            if causal:
                attn_mask = attn_mask & (keys[None, :] <= keys[:, None])  # [B, 1, T, T]
        cos, sin = self.rope_cos[start_pos:start_pos + T], self.rope_sin[start_pos:start_pos + T]
        x = self.dropout(self.embed(idx))
        for block in self.blocks:
            if kv_cache is not None:
                x = block(x, cos, sin, causal, kv_cache, start_pos)
            elif attn_mask is not None:  # positional: a checkpoint wrapper around the block may take no keywords
                x = block(x, cos, sin, causal, None, 0, attn_mask)
            else:
                x = block(x, cos, sin, causal)
        return self.lm_head(self.norm(x))

    def auxiliary_loss(self) -> tuple[torch.Tensor, dict] | None:
        """The variant's loss term beside the objective, from the last forward pass (weighted, ready to add),
        and its parts for logging; None for the dense model, which has none."""
        return None

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: matrices decayed; norms and other vectors not."""
        decay, no_decay = [], []
        for p in self.parameters():
            if p.requires_grad:
                (decay if p.dim() >= 2 else no_decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def new_kv_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        p = self.embed.weight
        return KVCache.empty(self.shape, batch, max_len or self.shape.max_seq_len, device=p.device, dtype=p.dtype)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Distinct parameters (a tied matrix counts once). exclude_embeddings drops every vocab x d_model
        matrix (the token embedding and, when untied, the output head): Kaplan's non-embedding N."""
        numel = lambda p: getattr(p, "ds_numel", p.numel())  # ZeRO-3 partitions parameters in place
        n = sum(numel(p) for p in self.parameters())
        if exclude_embeddings:
            n -= numel(self.embed.weight)
            if not self.shape.tie_embeddings:
                n -= numel(self.lm_head.weight)
        return n

    def flops_per_token(self, seq_len: int, causal: bool = False) -> float:
        """Training FLOPs per token, forward + backward, PaLM appendix B convention:
        6 N + 12 n_layer d_attn seq_len, where N counts the parameters that enter matmuls (non-embedding
        parameters plus the output head, which is a real matmul; the input lookup is not) and the second
        term is the attention score and value products. Causal attention (the AR arm) computes only the
        lower triangle, so it counts half of that term: the DLM's bidirectional attention does the full
        L^2 work, and counting both the same would flatter AR's MFU."""
        s = self.shape
        matmul_params = self.active_params(exclude_embeddings=True) + s.vocab_size * s.d_model
        attention = 12.0 * s.n_layer * s.n_head * s.head_dim * seq_len
        return 6.0 * matmul_params + (attention / 2 if causal else attention)

    def active_params(self, exclude_embeddings: bool = False) -> int:
        """The parameters one token's forward pass uses: all of them in the dense model."""
        return self.num_params(exclude_embeddings)
