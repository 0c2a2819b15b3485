"""The backbone's shape: named presets and custom fields."""
from __future__ import annotations

from typing import Optional

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

SHAPE_DEFAULTS = dict(tie_embeddings=True, qk_norm=False, rope_theta=10000.0, norm_eps=1e-5)


class ModelShape(SpecModel):
    """A fully resolved backbone: every field set. The trainer builds its model from this."""

    n_layer: int = Field(ge=1, le=512)
    d_model: int = Field(ge=8, le=65536)
    n_head: int = Field(ge=1, le=1024)
    n_kv_head: int = Field(ge=1, le=1024)
    d_ff: int = Field(ge=8, le=262144)
    vocab_size: int = Field(ge=8, le=1_048_576)
    max_seq_len: int = Field(ge=2, le=1_048_576)
    tie_embeddings: bool = True
    qk_norm: bool = False
    rope_theta: float = Field(default=10000.0, gt=0)
    norm_eps: float = Field(default=1e-5, gt=0, lt=1)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    attention_dropout: float = Field(default=0.0, ge=0, lt=1)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @model_validator(mode="after")
    def _heads_divide(self):
        if self.d_model % self.n_head:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head ({self.n_head}) must be divisible by n_kv_head ({self.n_kv_head})")
        if self.head_dim % 2:
            raise ValueError(f"head dimension d_model/n_head ({self.head_dim}) must be even for RoPE")
        return self


class ModelSpec(SpecModel):
    """`spec.model`: a preset, optionally with fields overridden, or a fully custom shape."""

    preset: Optional[str] = Field(default="micro", description=f"one of: {', '.join(PRESETS)}")
    n_layer: Optional[int] = Field(default=None, ge=1, le=512)
    d_model: Optional[int] = Field(default=None, ge=8, le=65536)
    n_head: Optional[int] = Field(default=None, ge=1, le=1024)
    n_kv_head: Optional[int] = Field(default=None, ge=1, le=1024, description="grouped-query attention")
    d_ff: Optional[int] = Field(default=None, ge=8, le=262144, description="SwiGLU hidden size")
    tie_embeddings: Optional[bool] = None
    qk_norm: Optional[bool] = None
    rope_theta: Optional[float] = Field(default=None, gt=0)
    norm_eps: Optional[float] = Field(default=None, gt=0, lt=1)
    dropout: float = Field(default=0.0, ge=0, lt=1, description="hidden dropout (AR dropout ablation)")
    attention_dropout: float = Field(default=0.0, ge=0, lt=1)
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
        overrides = {k: v for k, v in self.model_dump(exclude={"preset", "compile"}).items() if v is not None}
        if "n_head" in overrides and "n_kv_head" not in overrides:
            fields.pop("n_kv_head", None)  # a changed head count without GQA keeps full multi-head attention
        fields.update(overrides)
        fields.setdefault("n_kv_head", fields["n_head"])
        return ModelShape(vocab_size=vocab_size, max_seq_len=max_seq_len, **fields)
