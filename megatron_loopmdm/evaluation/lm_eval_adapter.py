"""An lm-evaluation-harness model, registered as `loopmdm` when `lm_eval` is installed.

    lm_eval --model loopmdm --model_args pretrained=hf_model,num_loops=4,mc_samples=128 ...
        (generation: ...,threshold=0.9,cache=dual; loops: ...,loop_stop=argmax,loop_per=sample)

(`import megatron_loopmdm.evaluation.lm_eval_adapter` first registers it, e.g. through
`tools/evaluate.py lm-eval`). Without `lm_eval` the class still works on any objects with an
`args` tuple shaped like the harness's requests.

- `loglikelihood((context, continuation))`: minus a Monte Carlo NELBO of the continuation given
  the context (which is never masked), with `mc_samples` stratified draws of t; `is_greedy`
  says whether the one-pass argmax of the fully masked continuation reproduces it.
- `loglikelihood_rolling((text,))`: minus the NELBO of the whole text.
- `generate_until((context, {"until": [...], "max_gen_toks": n}))`: the sampler, cut at the
  first stop string.
"""

from typing import List, Optional

from megatron_loopmdm.evaluation.nelbo import sequence_nelbo
from megatron_loopmdm.inference import LoopPolicy, SamplerConfig, generate

import torch

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError:  # optional: the class works without the harness
    LM = object

    def register_model(*_names):
        return lambda cls: cls


@register_model("loopmdm")
class LoopMDMEvalLM(LM):
    """A LoopMDM for lm-evaluation-harness.

    Args:
        pretrained: a Hugging Face or megatron directory (`load_for_inference`), unless `model`.
        model: an already loaded `LoopMDMForMaskedDiffusion`.
        tokenizer: an object with `tokenize(text) -> ids` and `detokenize(ids) -> text`;
            default: the Hugging Face tokenizer in `pretrained`.
        num_loops: loop count S (default the model's S_max).
        mc_samples: Monte Carlo draws per likelihood (LLaDA uses 128).
        gen_length, steps, block_length: sampler settings of `generate_until` (`max_gen_toks`
            overrides gen_length, rounded up to a multiple of block_length).
        seed: seed of the Monte Carlo and sampling noise (results are reproducible).
        threshold, factor: parallel decoding in `generate_until` (see `SamplerConfig`).
        cache: `none`, `prefix` or `dual` key/value caching in `generate_until`.
        loop_warm_start: `True` / `False`: the loop warm start in `generate_until`.
        loop_stop, loop_per, loop_threshold, loop_patience, loop_budget, min_loops, max_loops,
        loop_schedule ("1;2;2": model_args split at commas): the loop policy of
            `generate_until` (see
            `LoopPolicy`; adaptive when `loop_stop`, `loop_threshold` or `loop_budget` is given;
            none of them: `num_loops`). Likelihoods always use `num_loops`.
    """

    def __init__(
        self,
        pretrained: Optional[str] = None,
        model=None,
        tokenizer=None,
        num_loops: Optional[int] = None,
        mc_samples: int = 32,
        gen_length: int = 64,
        steps: Optional[int] = None,
        block_length: int = 32,
        device: str = "cpu",
        seed: int = 0,
        batch_size: int = 1,
        threshold: Optional[float] = None,
        factor: Optional[float] = None,
        cache: str = "none",
        loop_warm_start=False,
        loop_stop: Optional[str] = None,
        loop_per: str = "batch",
        loop_threshold: Optional[float] = None,
        loop_patience: int = 1,
        loop_budget: Optional[float] = None,
        min_loops: int = 1,
        max_loops: Optional[int] = None,
        loop_schedule: Optional[str] = None,
        **_unused,
    ):
        if LM is not object:
            super().__init__()
        if model is None:
            from megatron_loopmdm.hf import load_for_inference

            model = load_for_inference(pretrained, device=device)
        if tokenizer is None:
            from megatron_loopmdm.data.tokenizers import HuggingFaceTokenizer

            tokenizer = HuggingFaceTokenizer(str(pretrained))
        self.model, self.tokenizer = model, tokenizer
        self.num_loops = int(num_loops) if num_loops else model.config.max_loops
        self.mc_samples = int(mc_samples)
        self.gen_length, self.block_length = int(gen_length), int(block_length)
        self.steps = int(steps) if steps else None
        self.seed = int(seed)
        # model_args arrive as strings from the harness's command line.
        self.threshold = float(threshold) if threshold not in (None, "", "None") else None
        self.factor = float(factor) if factor not in (None, "", "None") else None
        self.cache = str(cache)
        self.loop_warm_start = _flag("loop_warm_start", loop_warm_start)
        self.loop_policy = _loop_policy(self.num_loops, loop_stop, loop_per, loop_threshold,
                                        loop_patience, loop_budget, min_loops, max_loops,
                                        loop_schedule)  # fmt: skip
        SamplerConfig(threshold=self.threshold, factor=self.factor, cache=self.cache)  # validate

    def _model_device(self):
        return next(self.model.parameters()).device

    def _nelbo(self, context: List[int], continuation: List[int]) -> float:
        tokens = torch.tensor([context + continuation], device=self._model_device())
        generator = torch.Generator().manual_seed(self.seed)
        nelbo = sequence_nelbo(
            self.model, tokens, self.num_loops, self.mc_samples, len(context), generator=generator
        )
        return float(nelbo[0])

    @torch.no_grad()
    def _is_greedy(self, context: List[int], continuation: List[int]) -> bool:
        mask_id = self.model.config.mask_token_id
        ids = torch.tensor([context + [mask_id] * len(continuation)], device=self._model_device())
        logits = self.model(ids, num_loops=self.num_loops).logits[0, len(context) :]
        return logits.argmax(-1).tolist() == list(continuation)

    def loglikelihood(self, requests) -> List[tuple]:
        """[(log-likelihood bound, is_greedy)] per `(context, continuation)` request."""
        results = []
        for request in requests:
            context, continuation = request.args[0], request.args[1]
            context_ids = self.tokenizer.tokenize(context)
            continuation_ids = self.tokenizer.tokenize(continuation)
            results.append(
                (
                    -self._nelbo(context_ids, continuation_ids),
                    self._is_greedy(context_ids, continuation_ids),
                )
            )
        return results

    def loglikelihood_rolling(self, requests) -> List[float]:
        """[log-likelihood bound of the whole text] per `(text,)` request."""
        return [-self._nelbo([], self.tokenizer.tokenize(r.args[0])) for r in requests]

    def generate_until(self, requests) -> List[str]:
        """[continuation text] per `(context, gen_kwargs)` request."""
        outputs = []
        for request in requests:
            context, kwargs = request.args[0], dict(request.args[1] or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            block = self.block_length
            length = int(kwargs.get("max_gen_toks", self.gen_length))
            block = min(block, length)
            length = -(-length // block) * block  # round up to whole blocks
            config = SamplerConfig(
                gen_length=length,
                steps=self.steps or length,
                block_length=block,
                temperature=float(kwargs.get("temperature", 0.0)),
                loops=self.loop_policy,
                threshold=self.threshold,
                factor=self.factor,
                cache=self.cache,
                loop_warm_start=self.loop_warm_start,
            )
            generator = torch.Generator().manual_seed(self.seed)
            prompt = self.tokenizer.tokenize(context)
            result = generate(self.model, [prompt], config, generator=generator)
            text = self.tokenizer.detokenize(result.generated[0].tolist())
            for stop in until:
                if stop and stop in text:
                    text = text[: text.index(stop)]
            outputs.append(text)
        return outputs


def _given(value) -> bool:
    return value not in (None, "", "None")


def _flag(name: str, value) -> bool:
    """A boolean model_arg: a bool, or `true`/`false` (`1`/`0`) as the harness passes it."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text not in ("true", "false", "1", "0"):
        raise ValueError(f"{name}={value!r}: give true or false.")
    return text in ("true", "1")


def _loop_policy(num_loops, stop, per, threshold, patience, budget, min_loops, max_loops,
                 schedule) -> LoopPolicy:  # fmt: skip
    """The `generate_until` loop policy from model_args (strings from the command line)."""
    if _given(schedule):
        return LoopPolicy.parse_schedule(str(schedule).replace(";", ","))
    if not (_given(stop) or _given(threshold) or _given(budget)):
        return LoopPolicy(num_loops=num_loops)
    return LoopPolicy(
        threshold=float(threshold) if _given(threshold) else None,
        stop=str(stop) if _given(stop) else "state", per=str(per), patience=int(patience),
        budget=float(budget) if _given(budget) else None, min_loops=int(min_loops),
        max_loops=int(max_loops) if _given(max_loops) else num_loops,
    )  # fmt: skip
