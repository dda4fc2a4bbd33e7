"""Batched text generation: transformers with left padding, or vLLM for merged models on a GPU.

`generate` returns, for each prompt, `n` continuations (the prompt removed), cut at the first stop string.
Greedy when `temperature == 0` (math, as the paper), sampling otherwise (code: 50 samples at T = 0.2).
Prompts are sorted by length so a batch pads little; results come back in input order.

Stopping: a sequence ends at the tokenizer's EOS (and the model's generation-config EOS ids), at a stop string, or
(`answer_stop`, a regular expression) as soon as its text matches it: the math tasks pass `ANSWER_LINE`, so a
generation ends with the line that gives "The answer is ..." instead of running on to the token limit repeating
itself. `progress(items)` is called after each batch and `on_tokens(count)` after each decoding step with the
number of sequences still running (the tokens just generated), for a live rate.

The vLLM backend is chosen automatically only when vLLM is importable, CUDA is present and the model is a plain
(merged) checkpoint directory without an adapter; otherwise transformers runs. vLLM is not installed on the
CPU machine the tests run on, so that path is not covered by tests.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

# The end of the line that states the final answer ("The answer is: 18", "The answer is 18."): the end of a
# math generation in the format of the paper's training data (MetaMathQA) and of GSM8K's answers.
ANSWER_LINE = r"[Tt]he (?:final )?answer is\b:?[ \t]*[^\s:][^\n]*\n"


def cut_at_stop(text: str, stop: Sequence[str], answer_stop: str | None = None) -> str:
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
    text = text[:cut]
    if answer_stop:
        match = re.search(answer_stop, text)
        if match:
            text = text[:match.end()].rstrip("\n")
    return text


def _eos_ids(model, tokenizer) -> list[int]:
    """The tokenizer's EOS and those of the model's generation config (chat models end turns with another token)."""
    ids = {tokenizer.eos_token_id}
    config_ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(config_ids if isinstance(config_ids, (list, tuple)) else [config_ids])
    return sorted(i for i in ids if i is not None)


def _stopping_criteria(tokenizer, prompt_length: int, eos_ids: list[int], answer_stop: str | None,
                       on_tokens: Callable[[int], None] | None):
    """transformers StoppingCriteria: a row is done when the text it generated matches `answer_stop`; also counts
    the tokens generated per step for `on_tokens`. Only the last 64 tokens of a row are decoded each step."""
    import torch
    from transformers import StoppingCriteria

    pattern = re.compile(answer_stop) if answer_stop else None

    class AnswerStop(StoppingCriteria):
        def __init__(self) -> None:
            self.done: torch.Tensor | None = None

        def __call__(self, input_ids, scores, **kwargs):
            rows = input_ids.shape[0]
            if self.done is None:
                self.done = torch.zeros(rows, dtype=torch.bool, device=input_ids.device)
                self.eos = torch.tensor(eos_ids, device=input_ids.device)  # once: a copy to the GPU each step waits
            running = int((~self.done).sum())
            self.done |= torch.isin(input_ids[:, -1], self.eos)
            if pattern is not None:
                tail = input_ids[:, max(prompt_length, input_ids.shape[1] - 64):]
                for row, text in enumerate(tokenizer.batch_decode(tail, skip_special_tokens=True)):
                    if not self.done[row] and pattern.search(text):
                        self.done[row] = True
            if on_tokens is not None:
                on_tokens(running)
            return self.done.clone()

    return AnswerStop()


_STOP_CRITERIA: dict[tuple[int, tuple[str, ...]], tuple[object, object]] = {}


def stop_string_criteria(tokenizer, stop: Sequence[str]):
    """transformers' `StopStringCriteria` for `stop`, built once per tokenizer and stop list.
    `generate(stop_strings=...)` builds it anew on every call, reading and sorting the whole vocabulary each batch
    (a fraction of a second with SmolLM2's; `benchmarks/RESULTS.md`); this is the same criterion, so generations
    stop at the same token."""
    from transformers import StopStringCriteria

    key = (id(tokenizer), tuple(stop))
    cached = _STOP_CRITERIA.get(key)
    if cached is None or cached[0] is not tokenizer:
        cached = _STOP_CRITERIA[key] = (tokenizer, StopStringCriteria(tokenizer, list(stop)))
    return cached[1]


def vllm_available() -> bool:
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return False
    import torch

    return torch.cuda.is_available()


def generate_transformers(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, temperature: float = 0.0,
                          n: int = 1, batch_size: int = 8, stop: Sequence[str] = (), seed: int = 0,
                          progress: Callable[[int], None] | None = None, answer_stop: str | None = None,
                          on_tokens: Callable[[int], None] | None = None) -> list[list[str]]:
    import torch
    from transformers import StoppingCriteriaList

    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(seed)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    outputs: list[list[str]] = [[] for _ in prompts]
    device = next(model.parameters()).device
    sampling = {"do_sample": True, "temperature": temperature, "top_p": 1.0} if temperature > 0 else {
        "do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    per_batch = max(1, batch_size // n) if n <= batch_size else 1
    eos_ids = _eos_ids(model, tokenizer)
    for start in range(0, len(order), per_batch):
        chunk = order[start:start + per_batch]
        encoded = tokenizer([prompts[i] for i in chunk], return_tensors="pt", padding=True).to(device)
        with torch.no_grad():
            criteria = [_stopping_criteria(tokenizer, encoded["input_ids"].shape[1], eos_ids, answer_stop, on_tokens)]
            criteria += [stop_string_criteria(tokenizer, stop)] if stop else []
            generated = model.generate(**encoded, max_new_tokens=max_new_tokens, num_return_sequences=n,
                                       pad_token_id=tokenizer.pad_token_id, eos_token_id=eos_ids,
                                       stopping_criteria=StoppingCriteriaList(criteria), **sampling)
        texts = tokenizer.batch_decode(generated[:, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
        for j, index in enumerate(chunk):
            outputs[index] = [cut_at_stop(t, stop, answer_stop) for t in texts[j * n:(j + 1) * n]]
        if progress is not None:
            progress(len(chunk))
    return outputs


_VLLM_ENGINES: dict[tuple[str, str, int], object] = {}


def generate_vllm(model_path: str, prompts: Sequence[str], max_new_tokens: int, temperature: float = 0.0,
                  n: int = 1, stop: Sequence[str] = (), seed: int = 0, dtype: str = "bfloat16",
                  answer_stop: str | None = None) -> list[list[str]]:
    from vllm import LLM, SamplingParams

    key = (model_path, dtype, seed)
    if key not in _VLLM_ENGINES:  # one engine per process and model: starting one takes tens of seconds
        _VLLM_ENGINES[key] = LLM(model=model_path, dtype=dtype, seed=seed)
    llm = _VLLM_ENGINES[key]
    params = SamplingParams(n=n, temperature=temperature, top_p=1.0, max_tokens=max_new_tokens, stop=list(stop))
    return [[cut_at_stop(o.text, stop, answer_stop) for o in result.outputs]
            for result in llm.generate(list(prompts), params)]


class Generator:
    """Generation backend chosen once: vLLM for a merged checkpoint directory (no adapter) when vLLM and CUDA are
    present, else transformers. The model is loaded on first use, so runs with nothing left to do load nothing."""

    def __init__(self, load: Callable[[], tuple], model_path: str | None, adapter: str | None, dtype: str,
                 batch_size: int, seed: int = 0):
        import os

        self.load, self.dtype, self.batch_size, self.seed = load, dtype, batch_size, seed
        merged_dir = model_path is not None and adapter is None and os.path.isdir(model_path)
        self.backend = "vllm" if merged_dir and vllm_available() else "transformers"
        self.model_path = model_path
        self.loaded = None

    def __call__(self, prompts: Sequence[str], max_new_tokens: int, temperature: float, n: int,
                 stop: Sequence[str] = (), answer_stop: str | None = None,
                 progress: Callable[[int], None] | None = None,
                 on_tokens: Callable[[int], None] | None = None) -> list[list[str]]:
        if self.backend == "vllm":
            outputs = generate_vllm(self.model_path, prompts, max_new_tokens, temperature, n, stop, self.seed,
                                    "bfloat16" if self.dtype == "float32" else self.dtype, answer_stop)
            if progress is not None:
                progress(len(prompts))
            return outputs
        if self.loaded is None:
            self.loaded = self.load()
        model, tokenizer = self.loaded
        return generate_transformers(model, tokenizer, prompts, max_new_tokens, temperature, n, self.batch_size,
                                     stop, self.seed, progress, answer_stop, on_tokens)
