"""lm-evaluation-harness adapter: score a dlmctl model with `lm_eval` tasks (local task files work offline).

    lm = DlmctlLM(model, tokenizer, arm="diffusion")
    lm_eval.simple_evaluate(model=lm, tasks=[...], task_manager=lm_eval.tasks.TaskManager(include_path=...))

The tokenizer is anything with encode(str) -> list[int], decode(list[int]) -> str, mask_id and eos_id.
AR log-likelihoods are exact; DLM ones are the Monte-Carlo bound of `scoring.dlm_loglikelihood`.
"""
from __future__ import annotations

from pathlib import Path

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window, simple_parse_args_string

from dlmctl.spec.sections import Arm

from .export import load_export
from .objectives import as_arm
from .sample import generate
from .scoring import loglikelihood


@register_model("dlmctl")
class DlmctlLM(LM):
    def __init__(
        self, model, tokenizer, arm: Arm | str, *, mc_samples: int = 16, seed: int = 0, batch_size: int = 16,
        max_gen_toks: int = 64, dlm_steps: int | None = None, dlm_block_length: int | None = None,
        greedy_check: bool = True,
    ):
        super().__init__()
        self.model, self.tokenizer, self.arm = model, tokenizer, as_arm(arm)
        self.mc_samples, self.seed, self.batch_size = mc_samples, seed, int(batch_size)
        self.max_gen_toks, self.dlm_steps, self.dlm_block_length = max_gen_toks, dlm_steps, dlm_block_length
        self.greedy_check = greedy_check
        self._device = next(model.parameters()).device

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        """`lm_eval --model dlmctl --model_args export=PATH[,mc_samples=N,...]`: a dlmctl export folder
        (`dlmctl export RUN -o PATH`)."""
        args = simple_parse_args_string(arg_string)
        if "export" not in args:
            raise ValueError("model_args: export=PATH (a folder written by `dlmctl export`) is required")
        model, tokenizer, arm = load_export(Path(args.pop("export")))
        extra = {k: v for k, v in (additional_config or {}).items() if k == "batch_size" and v is not None}
        return cls(model, tokenizer, arm, **{**args, **extra})

    @property
    def max_length(self) -> int:
        return self.model.shape.max_seq_len

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Tokenize context + continuation together so a merge across the boundary stays intact (as the
        harness's HF model does); trailing context spaces move to the continuation."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.tokenizer.encode(context + continuation)
        context_ids = self.tokenizer.encode(context)
        return whole[:len(context_ids)], whole[len(context_ids):]

    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        if self.arm is Arm.autoregressive:
            pairs = [(ctx or [self.tokenizer.eos_id], cont) for ctx, cont in pairs]
        return loglikelihood(self.model, self.arm, pairs, mask_id=self.tokenizer.mask_id, mc_samples=self.mc_samples,
                             seed=self.seed, batch_size=self.batch_size, greedy=self.greedy_check)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return self._score([self._encode_pair(*req.args) for req in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        results = []
        for req in requests:
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tokenizer.encode(req.args[0]), prefix_token=self.tokenizer.eos_id,
                max_seq_len=self.max_length, context_len=1)]
            results.append(sum(score for score, _ in self._score(windows)))
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        outputs = []
        for req in requests:
            context, gen_kwargs = req.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            gen_length = int(gen_kwargs.get("max_gen_toks", self.max_gen_toks))
            temperature = float(gen_kwargs.get("temperature", 0.0)) if gen_kwargs.get("do_sample", False) else 0.0
            block = self.dlm_block_length or gen_length
            gen_length = -(-gen_length // block) * block  # a whole number of blocks
            prompt = self.tokenizer.encode(context)
            if self.arm is Arm.autoregressive and not prompt:
                prompt = [self.tokenizer.eos_id]
            ids = generate(self.model, self.arm, prompt, gen_length=gen_length, mask_id=self.tokenizer.mask_id,
                           eos_id=self.tokenizer.eos_id, steps=self.dlm_steps, block_length=block,
                           temperature=temperature, top_k=gen_kwargs.get("top_k"), seed=self.seed)
            if self.tokenizer.eos_id in ids:
                ids = ids[:ids.index(self.tokenizer.eos_id)]
            text = self.tokenizer.decode(ids)
            for stop in until:
                if stop and stop in text:
                    text = text[:text.index(stop)]
            outputs.append(text)
        return outputs
