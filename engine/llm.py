"""Offline Python API over one in-process engine, in the shape vLLM users know.

    llm = LLM(model="smollm2-135m")
    out = llm.generate(["Hello"], SamplingParams(max_tokens=32, temperature=0.0))
    out[0].text, out[0].token_ids
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from pdserve.engine.config import (
    CacheConfig,
    EngineConfig,
    ModelConfig,
    SchedulerConfig,
    default_device,
)
from pdserve.engine.engine import Engine
from pdserve.models import DEFAULT_MODEL, resolve_model
from pdserve.protocol import FinishReason, IncrementalDetokenizer, SamplingParams
from pdserve.protocol.detok import Delta

Prompt = str | Sequence[int]
Message = dict[str, str]


@dataclass(frozen=True)
class CompletionOutput:
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" | "length" | "error"
    num_cached_tokens: int = 0
    error: str = ""  # why, when finish_reason is "error": this request's computation failed


class LLM:
    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        *,
        block_size: int = 16,
        num_blocks: int | None = None,
        kv_cache_memory_bytes: int = 1 << 30,
        enable_prefix_caching: bool = True,
        max_num_batched_tokens: int = 2048,
        max_num_seqs: int = 64,
        device: str | None = None,
        dtype: torch.dtype | None = None,
        seed: int = 0,
    ):
        path = resolve_model(model)
        self.engine = Engine(
            EngineConfig(
                model=ModelConfig.from_pretrained(path),
                cache=CacheConfig(block_size, num_blocks, kv_cache_memory_bytes,
                                  enable_prefix_caching),
                scheduler=SchedulerConfig(
                    max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs
                ),
                device=device or default_device(),
                dtype=dtype,
                seed=seed,
            )
        )
        self.tokenizer = _load_tokenizer(path)
        self._ids = itertools.count()

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[CompletionOutput]:
        """One output per prompt, in order. Prompts are strings or token-id lists.

        Everything is validated before any request starts, so a ValueError leaves the engine
        as it was; an error mid-run aborts every request of this call. A request whose own
        computation fails (e.g. NaN logits) ends with finish_reason "error" and `error` set,
        and the others run on.
        """
        prompt_list = _as_prompt_list(prompts)
        param_list = self._params_per_prompt(params, len(prompt_list))
        token_lists = [self._tokenize(p) for p in prompt_list]
        return self._run(token_lists, param_list)

    def chat(
        self,
        conversations: Sequence[Message] | Sequence[Sequence[Message]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[CompletionOutput]:
        """Apply the model's chat template to each conversation and generate the reply."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]  # a single conversation
        tokenizer = self._require_tokenizer("chat")
        token_lists = []
        for conv in conversations:
            if not conv:
                raise ValueError("a conversation must hold at least one message")
            ids = tokenizer.apply_chat_template(list(conv), add_generation_prompt=True,
                                                tokenize=True, return_dict=False)
            token_lists.append(list(ids))
        return self._run(token_lists, self._params_per_prompt(params, len(token_lists)))

    def _decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[str]:
        """Yield the text of one completion piece by piece as tokens are produced. Raises
        RuntimeError with the engine's reason if the request's computation fails."""
        self._require_tokenizer("streamed text")
        tokens = self._tokenize(prompt)
        params = params or SamplingParams()
        request_id = f"stream-{next(self._ids)}"
        detok = IncrementalDetokenizer(self._decode, params.stop)
        self.engine.add_request(request_id, tokens, params)
        try:
            while self.engine.has_work():
                for out in self.engine.step():
                    if out.request_id != request_id:
                        continue
                    if out.finish_reason is FinishReason.ERROR:
                        raise RuntimeError(out.error)
                    delta = detok.add(out.new_token_ids)
                    if out.finished and not delta.stopped:
                        delta = Delta(delta.text + detok.finish().text, False)
                    yield delta.text
                    if delta.stopped or out.finished:
                        return
        finally:
            self.engine.abort(request_id)

    def _run(self, token_lists: list[list[int]], param_list: list[SamplingParams]):
        for params in param_list:
            if params.stop and self.tokenizer is None:
                raise ValueError("stop strings need a tokenizer; this model folder has none")
        request_ids = [f"gen-{next(self._ids)}" for _ in token_lists]
        outputs = {rid: _Output(self._decode if self.tokenizer else None, p.stop)
                   for rid, p in zip(request_ids, param_list, strict=True)}
        results: dict[str, CompletionOutput] = {}
        try:
            for rid, tokens, params in zip(request_ids, token_lists, param_list, strict=True):
                self.engine.add_request(rid, tokens, params)
            while len(results) < len(request_ids):
                for out in self.engine.step():
                    output = outputs[out.request_id]
                    stopped = output.add(out.new_token_ids)
                    if stopped:
                        self.engine.abort(out.request_id)
                    if stopped or out.finished:
                        results[out.request_id] = output.result(
                            None if stopped else out.finish_reason, out.num_cached_tokens,
                            out.error)
        finally:
            for rid in request_ids:
                self.engine.abort(rid)
        return [
            replace(results[rid], prompt_token_ids=tokens)
            for rid, tokens in zip(request_ids, token_lists, strict=True)
        ]

    def _tokenize(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty")
            tokens = self._require_tokenizer("text prompts").encode(prompt)
        else:
            tokens = [int(t) for t in prompt]
        if not tokens:
            raise ValueError("prompt is empty")
        max_len = self.engine.config.model.max_model_len
        if len(tokens) >= max_len:
            raise ValueError(
                f"prompt has {len(tokens)} tokens; the model's maximum length is {max_len}"
            )
        vocab = self.engine.config.model.vocab_size
        if any(not 0 <= t < vocab for t in tokens):
            raise ValueError(f"prompt holds a token id outside the vocabulary [0, {vocab})")
        return tokens

    def _params_per_prompt(self, params, n: int) -> list[SamplingParams]:
        if params is None:
            return [SamplingParams()] * n
        if isinstance(params, SamplingParams):
            return [params] * n
        if len(params) != n:
            raise ValueError(f"got {len(params)} SamplingParams for {n} prompts")
        return list(params)

    def _require_tokenizer(self, what: str):
        if self.tokenizer is None:
            raise ValueError(f"{what} need a tokenizer; this model folder has none")
        return self.tokenizer


class _Output:
    """One request's tokens and text. With stop strings the text is detokenized as tokens
    come, to cut at a stop string exactly; without, it is decoded once, at the end."""

    def __init__(self, decode, stop: Sequence[str]):
        self.token_ids: list[int] = []
        self._decode = decode
        self._detok = IncrementalDetokenizer(decode, stop) if decode and stop else None

    def add(self, token_ids: Sequence[int]) -> bool:
        """Append tokens; True when a stop string appeared (the text ends before it)."""
        self.token_ids += token_ids
        return self._detok is not None and self._detok.add(token_ids).stopped

    def result(self, reason: FinishReason | None, num_cached: int,
               error: str = "") -> CompletionOutput:
        """`reason` None: a stop string ended it."""
        if self._detok is not None:
            if self._detok.finish().stopped:
                reason = None
            text = self._detok.text
        else:
            text = self._decode(self.token_ids) if self._decode else ""
        return CompletionOutput([], list(self.token_ids), text,
                                reason.value if reason else "stop", num_cached, error)


def _as_prompt_list(prompts) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts given")
    if all(isinstance(t, int) for t in prompts):
        return [prompts]  # one prompt given as token ids
    return prompts


def _load_tokenizer(path: Path):
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))
