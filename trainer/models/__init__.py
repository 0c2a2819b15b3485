"""The model registry (torchtitan's models/<name>/ and its registry, litgpt's config-chosen MLP): a variant's
name, as `spec.model.variant` gives it, to what the variant supplies.

- its shape config: the section of `ModelShape` it reads (validated with the spec, which is torch-free);
- its module: a Transformer subclass built from the shape, which also supplies `flops_per_token` (active
  parameters), `param_groups` (AdamW groups) and `auxiliary_loss` (a term the training step adds to the
  objective, or None).

Adding a variant: a module here with its Transformer subclass, its section in spec/model.py, a line below.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from dlmctl.spec import ModelShape
from dlmctl.spec.model import MoEShape

from .dense import KVCache, Transformer
from .moe import MoETransformer


@dataclass(frozen=True)
class Variant:
    model: type[Transformer]
    config: Optional[type]  # its section of ModelShape (ModelShape.<variant>); None: the shape alone


VARIANTS: dict[str, Variant] = {
    "dense": Variant(Transformer, None),
    "moe": Variant(MoETransformer, MoEShape),
}


def build(shape: ModelShape) -> Transformer:
    """The model `shape` describes, freshly initialised (seed torch's generator first for fixed weights)."""
    return VARIANTS[shape.variant].model(shape)


__all__ = ["KVCache", "MoETransformer", "Transformer", "VARIANTS", "Variant", "build"]
