"""A dlmctl diffusion LM for Hugging Face `transformers`: shipped verbatim in every DLM export as
modeling_dlm.py and found through config.json's auto_map, so that

    model = AutoModelForMaskedLM.from_pretrained(export, trust_remote_code=True)
    logits = model(input_ids).logits

runs the trained denoiser. The backbone is transformers' own Llama (Qwen3 when the model has QK-norm) with
the same weight names as the autoregressive export; the one difference is that attention is
bidirectional. A masked diffusion LM (LLaDA/MDLM) reads a sequence in which some positions hold the
mask token (config.mask_token_id) and predicts the original token at each of them. It generates by
iterative unmasking (dlmctl.trainer.sample.dlm_generate drives this model as is), not with `generate`;
log-likelihoods computed from it are an ELBO, a lower bound. This file must not import dlmctl.
"""
from __future__ import annotations

import transformers
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel, Qwen3Config, Qwen3ForCausalLM, Qwen3Model
from transformers.modeling_outputs import MaskedLMOutput

try:  # decoder-only models honour config.is_causal = False since masking_utils has bidirectional masks
    from transformers.masking_utils import create_bidirectional_mask  # noqa: F401
except ImportError:
    raise ImportError(f"a dlmctl diffusion export needs a transformers with bidirectional attention masks for "
                      f"decoder models (5.x); this is {transformers.__version__}") from None


class DlmLlamaConfig(LlamaConfig):
    model_type = "llama_dlm"


class DlmQwen3Config(Qwen3Config):
    model_type = "qwen3_dlm"


class _Bidirectional:
    """Every position attends to every other: the mask built from the config (`create_causal_mask` falls back
    to the bidirectional one when config.is_causal is False) and each attention module's `is_causal`, which
    scaled_dot_product_attention and flash attention use when there is no mask to build."""

    def __init__(self, config):
        config.is_causal = False
        super().__init__(config)
        for module in self.modules():
            if hasattr(module, "is_causal"):
                module.is_causal = False


class _MaskedLM(_Bidirectional):
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, **kwargs):
        if kwargs.get("labels") is not None:
            raise ValueError("labels: the diffusion loss weights each masked token's cross-entropy by 1/t, the "
                             "masking ratio (the ELBO); compute it from .logits")
        out = super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              inputs_embeds=inputs_embeds, use_cache=False, **kwargs)
        return MaskedLMOutput(logits=out.logits, hidden_states=out.hidden_states, attentions=out.attentions)

    @classmethod
    def can_generate(cls) -> bool:
        return False

    def generate(self, *args, **kwargs):
        raise NotImplementedError("a diffusion LM generates by iterative unmasking (dlmctl.trainer.sample.dlm_generate "
                                  "accepts this model), not left to right")


class DlmLlamaModel(_Bidirectional, LlamaModel):
    config_class = DlmLlamaConfig


class DlmLlamaForMaskedLM(_MaskedLM, LlamaForCausalLM):
    config_class = DlmLlamaConfig


class DlmQwen3Model(_Bidirectional, Qwen3Model):
    config_class = DlmQwen3Config


class DlmQwen3ForMaskedLM(_MaskedLM, Qwen3ForCausalLM):
    config_class = DlmQwen3Config
