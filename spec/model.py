"""The backbone's shape: named presets and custom fields, and the model variant (dense, or mixture-of-experts)."""
from __future__ import annotations

from typing import Annotated, Literal, Optional

from pydantic import Field, ValidationError, model_validator

from .base import SpecModel

# Tiny presets train on a laptop CPU; the large ones are the published DLM-vs-AR shapes.
PRESETS: dict[str, dict] = {
    "nano": dict(n_layer=2, d_model=64, n_head=4, n_kv_head=4, d_ff=192),
    "micro": dict(n_layer=4, d_model=128, n_head=4, n_kv_head=4, d_ff=384),
    "mini": dict(n_layer=6, d_model=256, n_head=8, n_kv_head=8, d_ff=704),
    "110m": dict(n_layer=12, d_model=768, n_head=12, n_kv_head=12, d_ff=2048),
    "350m": dict(n_layer=24, d_model=1024, n_head=16, n_kv_head=16, d_ff=2816),
    # MegaDLMs' 1B (hf_configs/gpt2_1b_dlm) and the Qwen3-1.7B shape: QK-norm and RMSNorm eps 1e-6 as there.
    "1b": dict(n_layer=26, d_model=1792, n_head=14, n_kv_head=14, d_ff=4736, tie_embeddings=True, qk_norm=True,
               norm_eps=1e-6),
    "1.7b": dict(
        n_layer=28, d_model=2048, n_head=16, n_kv_head=16, d_ff=6144, tie_embeddings=False, qk_norm=True,
        norm_eps=1e-6,
    ),
}
# The sparsity sweep's dense 8B: the Qwen3-8B shape (GQA 32/8, QK-norm, untied), 7.4B parameters with a 50k vocabulary.
PRESETS["8b"] = dict(n_layer=36, d_model=4096, n_head=32, n_kv_head=8, d_ff=12288, tie_embeddings=False, qk_norm=True,
                     norm_eps=1e-6)
# Its 8B-total / 1B-active mixture of experts: the 1b backbone with each SwiGLU split into 96 experts of width
# 4736/8, 8 of them per token. A token's active feed-forward is the 1b's d_ff, so it computes as much as the dense
# 1b (plus a 1792 x 96 router per layer) while holding 8.4B parameters, as many as the dense 8b.
PRESETS["8b1a"] = dict(PRESETS["1b"], variant="moe", moe=dict(experts=96, top_k=8, expert_d_ff=592))

SHAPE_DEFAULTS = dict(tie_embeddings=True, qk_norm=False, rope_theta=10000.0, norm_eps=1e-5)
# Switch Transformer's load-balancing coefficient and ST-MoE's router z-loss coefficient.
MOE_DEFAULTS = dict(experts=8, top_k=2, capacity_factor=None, aux_loss_coef=0.01, z_loss_coef=0.001)


# Each field's type and range, once: a resolved shape has every one; the spec may leave any unset.
Layers = Annotated[int, Field(ge=1, le=512)]
Width = Annotated[int, Field(ge=8, le=65536)]
Heads = Annotated[int, Field(ge=1, le=1024)]
Hidden = Annotated[int, Field(ge=8, le=262144)]
Theta = Annotated[float, Field(gt=0)]
Epsilon = Annotated[float, Field(gt=0, lt=1)]
Rate = Annotated[float, Field(ge=0, lt=1)]
Experts = Annotated[int, Field(ge=1, le=1024)]
Capacity = Annotated[float, Field(gt=0)]
Weight = Annotated[float, Field(ge=0)]
Variant = Literal["dense", "moe"]
VARIANTS: tuple[str, ...] = Variant.__args__


class MoEShape(SpecModel):
    """A resolved mixture-of-experts feed-forward: every field set (capacity_factor None: dropless)."""

    experts: Experts
    top_k: Experts
    expert_d_ff: Hidden
    capacity_factor: Optional[Capacity] = None
    aux_loss_coef: Weight = MOE_DEFAULTS["aux_loss_coef"]
    z_loss_coef: Weight = MOE_DEFAULTS["z_loss_coef"]

    @model_validator(mode="after")
    def _top_k_at_most_experts(self):
        if self.top_k > self.experts:
            raise ValueError(f"moe.top_k ({self.top_k}) must be at most moe.experts ({self.experts})")
        return self

    def capacity(self, tokens: int) -> int:
        """Slots per expert for `tokens` routed tokens: ceil(capacity_factor * tokens * top_k / experts)."""
        return -(-int(self.capacity_factor * tokens * self.top_k) // self.experts)


class ModelShape(SpecModel):
    """A fully resolved backbone: every field set. The trainer builds its model from this."""

    n_layer: Layers
    d_model: Width
    n_head: Heads
    n_kv_head: Heads
    d_ff: Hidden
    vocab_size: int = Field(ge=8, le=1_048_576)
    max_seq_len: int = Field(ge=2, le=1_048_576)
    tie_embeddings: bool = SHAPE_DEFAULTS["tie_embeddings"]
    qk_norm: bool = SHAPE_DEFAULTS["qk_norm"]
    rope_theta: Theta = SHAPE_DEFAULTS["rope_theta"]
    norm_eps: Epsilon = SHAPE_DEFAULTS["norm_eps"]
    dropout: Rate = 0.0
    attention_dropout: Rate = 0.0
    variant: Variant = "dense"
    moe: Optional[MoEShape] = None

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @model_validator(mode="after")
    def _heads_divide(self):
        if (self.variant == "moe") != (self.moe is not None):
            raise ValueError("moe: set for, and only for, variant moe")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head ({self.n_head}) must be divisible by n_kv_head ({self.n_kv_head})")
        if self.head_dim % 2:
            raise ValueError(f"head dimension d_model/n_head ({self.head_dim}) must be even for RoPE")
        return self


class MoESpec(SpecModel):
    """`spec.model.moe`: a mixture-of-experts feed-forward in every block (top-k softmax routing). Unset fields
    come from the preset, else the defaults given."""

    experts: Optional[Experts] = Field(default=None, description="experts per block; unset: 8")
    top_k: Optional[Experts] = Field(default=None, description="experts per token; unset: 2")
    expert_d_ff: Optional[Hidden] = Field(default=None, description="each expert's SwiGLU hidden size; unset: d_ff")
    capacity_factor: Optional[Capacity] = Field(
        default=None, description="unset: dropless, every token reaches its top_k experts. Set: each expert "
        "takes at most ceil(capacity_factor x tokens x top_k / experts) tokens of a forward pass, the first in token "
        "order, and a dropped token's expert adds nothing (its residual passes). A token's fate then depends on "
        "the other sequences of its micro-batch, so results depend on the batch layout")
    aux_loss_coef: Optional[Weight] = Field(default=None, description="load-balancing loss weight; unset: 0.01")
    z_loss_coef: Optional[Weight] = Field(default=None, description="router z-loss weight; unset: 0.001")


class ModelSpec(SpecModel):
    """`spec.model`: a preset, optionally with fields overridden, or a fully custom shape."""

    preset: Optional[str] = Field(default="micro", description=f"one of: {', '.join(PRESETS)}")
    n_layer: Optional[Layers] = None
    d_model: Optional[Width] = None
    n_head: Optional[Heads] = None
    n_kv_head: Optional[Heads] = Field(default=None, description="grouped-query attention")
    d_ff: Optional[Hidden] = Field(default=None, description="SwiGLU hidden size")
    tie_embeddings: Optional[bool] = None
    qk_norm: Optional[bool] = None
    rope_theta: Optional[Theta] = None
    norm_eps: Optional[Epsilon] = None
    dropout: Rate = Field(default=0.0, description="hidden dropout (AR dropout ablation)")
    attention_dropout: Rate = 0.0
    variant: Optional[Variant] = Field(
        default=None, description="dense: one SwiGLU per block; moe: a mixture of SwiGLU experts (see moe). Unset: "
        "the preset's (8b1a is moe, the others dense), or moe when a moe section is given")
    moe: Optional[MoESpec] = Field(default=None, description="the mixture of experts, for variant moe")
    compile: Optional[bool] = Field(
        default=None, description="torch.compile each transformer block (fused kernels; the first step also "
        "compiles, its time is logged). Unset: on with CUDA, where it pays off; off on CPU, where compiling takes "
        "longer than a small run gains, and under ZeRO-3")

    @model_validator(mode="after")
    def _known_preset_or_complete(self):
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"preset: unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        if self.preset is None:
            missing = [f for f in ("n_layer", "d_model", "n_head", "d_ff") if getattr(self, f) is None]
            if missing:
                raise ValueError(f"without a preset, {', '.join(missing)} must be set")
        try:  # head/width divisibility of the resolved shape, checked now rather than when training starts
            self.resolve(vocab_size=256, max_seq_len=8)
        except ValidationError as err:
            raise ValueError(err.errors()[0]["msg"].removeprefix("Value error, ")) from None
        return self

    def resolve(self, vocab_size: int, max_seq_len: int) -> ModelShape:
        fields = dict(SHAPE_DEFAULTS)
        if self.preset is not None:
            fields.update(PRESETS[self.preset])
        overrides = {k: v for k, v in self.model_dump(exclude={"preset", "compile", "moe"}).items() if v is not None}
        if "n_head" in overrides and "n_kv_head" not in overrides:
            fields.pop("n_kv_head", None)  # a changed head count without GQA keeps full multi-head attention
        fields.update(overrides)
        fields.setdefault("n_kv_head", fields["n_head"])
        fields.setdefault("variant", "dense" if self.moe is None else "moe")
        preset_moe = fields.pop("moe", None) or {}
        if fields["variant"] == "moe":
            moe_overrides = {} if self.moe is None else self.moe.model_dump(exclude_none=True)
            fields["moe"] = {**MOE_DEFAULTS, "expert_d_ff": fields["d_ff"], **preset_moe, **moe_overrides}
        elif self.moe is not None:
            raise ValueError("moe: only for variant moe")
        return ModelShape(vocab_size=vocab_size, max_seq_len=max_seq_len, **fields)
