"""``Model``: a loaded package with the three public layers over one decode loop.

    generate_ids / batch_generate_ids   token ids in, token ids out (bring your own tokenizer)
    stream_generate / stream_chat       yield :class:`Response` pieces
    generate / batch_generate / chat    return text

Prompts, token ids and messages are checked first (:mod:`portable_infer.text.prompts`): a wrong type,
invalid Unicode, a bool or an id outside the vocabulary is an :class:`InvalidArgumentError`.
The batch calls run their prompts in sub-batches of at most ``max_batch_tokens`` KV tokens
(:func:`portable_infer.decode.generate.plan_batches`), so memory stays bounded for any number of prompts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from portable_infer.decode.constraints import Guide
from portable_infer.decode.generate import BatchDecoder, check_batch_tokens, check_prompt, plan_batches
from portable_infer.decode.sampling import SamplingParams
from portable_infer.errors import InvalidArgumentError
from portable_infer.package.manifest import Manifest
from portable_infer.text.codec import TextCodec
from portable_infer.text.streaming import Response
from portable_infer.text.tool_chat import chat_with_tools, stream_chat_with_tools, wants_tools

logger = logging.getLogger(__name__)


def check_max_kv_tokens(max_kv_tokens) -> None:
    if max_kv_tokens is not None and (not isinstance(max_kv_tokens, int) or isinstance(max_kv_tokens, bool)
                                      or max_kv_tokens < 2):
        raise InvalidArgumentError(f"max_kv_tokens must be an int >= 2 (prompt + generated tokens kept in "
                                   f"the KV cache), got {max_kv_tokens!r}; or None for the model's context")


class Model:
    """A model package loaded on an execution provider. Build it with :func:`portable_infer.load`.

    ``codec`` (:class:`~portable_infer.text.codec.TextCodec`) turns text into token ids and back;
    without one, the manifest's special tokens and no tokenizer (token ids only).
    """

    def __init__(self, manifest: Manifest, engine, codec: TextCodec | None = None, path: Path | None = None,
                 selection=None, max_kv_tokens: int | None = None):
        check_max_kv_tokens(max_kv_tokens)
        self.max_kv_tokens = max_kv_tokens
        self.manifest = manifest
        self.engine = engine
        self.codec = codec if codec is not None else TextCodec.from_manifest(manifest)
        self.path = path
        self.selection = selection
        self._guide: Guide | None = None
        g = manifest.generation
        self.defaults = SamplingParams(max_new_tokens=g.max_new_tokens, temperature=g.temperature,
                                       top_k=g.top_k, top_p=g.top_p, repetition_penalty=g.repetition_penalty)

    # --- what runs ------------------------------------------------------------------------------
    @property
    def provider(self) -> str:
        """The ONNX Runtime provider that really runs the graph (checked at load)."""
        return self.engine.provider

    @property
    def variant(self) -> str:
        return self.engine.variant.name

    @property
    def max_context(self) -> int:
        """The model's context, or ``max_kv_tokens`` when that is smaller (load(max_kv_tokens=...))."""
        return min(self.manifest.model.max_context, self.max_kv_tokens or self.manifest.model.max_context)

    @property
    def session_env(self) -> str:
        """The kernel switch its session was made with (the provider row's ``session_envs`` entry,
        e.g. CUDA's ``xqa-off``; "" when none)."""
        return getattr(self.selection, "session_env", "") or ""

    def __repr__(self) -> str:
        m = self.manifest.model
        switch = f"+{self.session_env}" if self.session_env else ""
        return (f"Model({m.model_type}, {m.num_layers} layers, {self.manifest.precision}, "
                f"variant={self.variant}{switch}, provider={self.provider})")

    # --- tokens (the codec's) -------------------------------------------------------------------
    @property
    def tokenizer(self):
        """The package's ``tokenizers.Tokenizer`` (None: token ids only)."""
        return self.codec.tokenizer

    @property
    def chat_template(self):
        """The package's :class:`~portable_infer.text.chat_template.ChatTemplate` (or None)."""
        return self.codec.chat_template

    def require_tokenizer(self):
        """The package's tokenizer, or PackageError when it has none (token ids only)."""
        return self.codec.require_tokenizer()

    def encode(self, text: str, add_special_tokens: bool = True) -> list:
        """Token ids of ``text`` (valid Unicode; InvalidArgumentError names a bad character)."""
        return self.codec.encode(text, add_special_tokens)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.codec.decode(ids, skip_special_tokens)

    def as_ids(self, prompt, what: str = "prompt") -> list:
        """Text (encoded) or token ids (checked) -> a list of token ids; ``what`` names it in errors."""
        return self.codec.as_ids(prompt, what)

    def chat_ids(self, messages: list, tools: list | None = None) -> list:
        """Token ids of ``messages`` rendered with the package's chat template (and ``tools``)."""
        return self.codec.chat_ids(messages, tools)

    @property
    def guide(self) -> Guide:
        """Compiles this model's constraints (response_format, constraint=): llguidance's view of
        the tokenizer is built on first use (about a second for a 50k vocabulary)."""
        if self._guide is None:
            self._guide = Guide(self.codec.require_tokenizer(), self.codec.vocab_size, self.codec.eos_ids)
        return self._guide

    def params(self, **sampling) -> SamplingParams:
        return SamplingParams.from_kwargs(self.defaults, **sampling)

    def _decoder(self, prompts: list, params: SamplingParams, truncate: bool) -> BatchDecoder:
        return BatchDecoder(self.engine, prompts, [params] * len(prompts), eos_ids=self.codec.eos_ids,
                            max_context=self.max_context, pad_id=self.codec.pad_id, truncate=truncate,
                            guide=self.guide if params.constraint is not None else None,
                            vocab_size=self.codec.vocab_size)

    # --- token-level layer ----------------------------------------------------------------------
    def generate_ids(self, prompt_ids, *, truncate: bool = False, **sampling) -> list:
        """Generated token ids for one prompt given as ids (stop strings need text: use generate)."""
        if isinstance(prompt_ids, str):
            raise InvalidArgumentError("generate_ids takes token ids; use generate for text", param="prompt")
        return self._batch_ids([prompt_ids], truncate, None, sampling, names="prompt")[0]

    def batch_generate_ids(self, prompts, *, truncate: bool = False, max_batch_tokens: int | None = None,
                           **sampling) -> list:
        """Generated ids for several prompts, in their order; decoded with left padding in
        sub-batches of at most ``max_batch_tokens`` KV tokens (see :meth:`batch_generate`)."""
        return self._batch_ids(prompts, truncate, max_batch_tokens, sampling)

    def _batch_ids(self, prompts, truncate: bool, max_batch_tokens, sampling: dict, names: str = "prompts[{}]"):
        params = self.params(**sampling)
        if params.stop:  # silently ignoring them would run on past the user's stop
            raise InvalidArgumentError(f"stop strings match text, and generate_ids works on token ids (got "
                                       f"stop={list(params.stop)}); use stop_token_ids, or generate / "
                                       f"stream_generate for stop strings", param="stop")
        out = [None] * len(prompts) if isinstance(prompts, (list, tuple)) else []
        for rows, dec in self._sub_batches(prompts, params, truncate, max_batch_tokens, names):
            for i, ids in zip(rows, dec.run()):
                out[i] = ids
        return out

    def _sub_batches(self, prompts, params: SamplingParams, truncate: bool, max_batch_tokens,
                     names: str = "prompts[{}]"):
        """Yield ``(prompt indices, BatchDecoder)`` per sub-batch, each made (and prefilled) only
        when the one before is done; every prompt is checked (errors call prompt i ``names``)
        before the first runs."""
        if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
            raise InvalidArgumentError(f"prompts must be a list of prompts, got {type(prompts).__name__}; "
                                       f"use generate for one", param="prompt")
        if not prompts:
            raise InvalidArgumentError("prompts is empty: give at least one prompt", param="prompt")
        budget = check_batch_tokens(max_batch_tokens)
        ids = [check_prompt(self.codec.as_ids(p, names.format(i)), self.max_context, truncate)
               for i, p in enumerate(prompts)]
        for rows in plan_batches([len(x) for x in ids], params.max_new_tokens, self.max_context, budget):
            yield rows, self._decoder([ids[i] for i in rows], params, truncate)

    def forward_logits(self, ids) -> np.ndarray:
        """Logits [len, vocab] for every position of ``ids`` (teacher forcing).

        One pass; token by token through the cache on graphs that return the last position only.
        """
        ids = check_prompt(self.codec.as_ids(ids), self.max_context + 1, truncate=False)
        arr = np.asarray([ids], dtype=np.int64)
        cache = self.engine.new_cache(1, capacity=len(ids))
        if self.engine.variant.logits == "all":
            return self.engine.forward(arr, np.ones_like(arr), cache, all_logits=True)[0]
        # this graph returns the last position's logits only: feed the tokens one by one, into one
        # array (stacking a list of rows held the logits twice at the end: +31 MB for 160 tokens)
        out = None
        for t in range(arr.shape[1]):
            row = self.engine.forward(arr[:, t:t + 1], np.ones((1, t + 1), np.int64), cache)[0]
            if out is None:
                out = np.empty((arr.shape[1], *row.shape), row.dtype)
            out[t] = row
        return out

    # --- streaming layer ------------------------------------------------------------------------
    def stream_generate(self, prompt, *, truncate: bool = False, **sampling) -> Iterator[Response]:
        """Yield :class:`Response` pieces as tokens are generated.

        Args:
            prompt: text (encoded with the package tokenizer) or a list of token ids.
            truncate: keep the prompt's last tokens when it is longer than the context.
            **sampling: :class:`SamplingParams` fields (temperature, top_p, stop, seed, ...).
        """
        ids = self.codec.as_ids(prompt)
        params = self.params(**sampling)
        yield from self.stream_tokens(ids, params, truncate)

    def stream_tokens(self, ids: list, params: SamplingParams, truncate: bool) -> Iterator[Response]:
        """:meth:`stream_generate` for checked token ids and built SamplingParams."""
        if params.stop:
            self.codec.require_tokenizer()  # stop strings are matched on text
        start = time.perf_counter()
        dec = self._decoder([ids], params, truncate)
        text = self.codec.text_stream(params)
        n = 0
        meta = {"prompt_tokens": len(dec.rows[0].prompt)}
        while not dec.done:
            for ev in dec.step():
                n += 1
                piece, reason = text.piece(ev.token, ev.finish_reason)
                if reason is not None and ev.finish_reason is None:  # a stop string
                    dec.finish(0, "stop")
                elapsed = max(dec.timings["decode_s"], 1e-9)
                yield Response(piece, ev.token, reason, ev.logprob, ev.top_logprobs, generation_tokens=n,
                               ttft_s=dec.timings["prefill_s"],
                               decode_tokens_per_s=dec.timings["decode_steps"] / elapsed, **meta)
        logger.debug("generated %d tokens in %.3f s", n, time.perf_counter() - start)

    def stream_chat(self, messages: list, *, tools=None, tool_choice=None, parallel_tool_calls=None,
                    tool_parser=None, truncate: bool = False, **sampling) -> Iterator:
        """Like :meth:`stream_generate` for chat messages rendered with the package's template; with
        ``tools`` (see :meth:`chat`), one :class:`~portable_infer.text.tool_stream.ChatDelta` per token instead
        (content, tool-call pieces), the last with ``finish_reason`` and the whole ``message``."""
        if wants_tools(tools, tool_choice, parallel_tool_calls, tool_parser):
            yield from stream_chat_with_tools(self, messages, tools, tool_choice, parallel_tool_calls, tool_parser,
                                              truncate=truncate, **sampling)
            return
        yield from self.stream_tokens(self.codec.chat_ids(messages), self.params(**sampling), truncate)

    # --- text layer -----------------------------------------------------------------------------
    def generate(self, prompt, **kwargs) -> str:
        """The completion of ``prompt`` (a str, or a list of token ids) as text."""
        if not isinstance(prompt, str):
            self.codec.as_ids(prompt)  # a wrong type is an InvalidArgumentError before the missing tokenizer
        self.codec.require_tokenizer()  # without one every piece would be "" (use generate_ids)
        return "".join(r.text for r in self.stream_generate(prompt, **kwargs))

    def chat(self, messages: list, *, tools=None, tool_choice=None, parallel_tool_calls=None, tool_parser=None,
             **kwargs):
        """The assistant's reply to ``messages`` ([{"role": ..., "content": ...}, ...]) as text.

        With ``tools`` (OpenAI's function definitions; ``tool_choice`` "auto", "required", "none" or
        ``{"type": "function", "function": {"name": ...}}``; ``parallel_tool_calls``; ``tool_parser``
        to name the call format): a :class:`~portable_infer.text.tool_stream.ChatMessage` with ``content``
        and parsed ``tool_calls`` (see docs/serving.md, *Tool calling*)."""
        if not wants_tools(tools, tool_choice, parallel_tool_calls, tool_parser):
            return "".join(r.text for r in self.stream_chat(messages, **kwargs))
        return chat_with_tools(self, messages, tools, tool_choice, parallel_tool_calls, tool_parser, **kwargs)

    def batch_generate(self, prompts: list, *, truncate: bool = False, max_batch_tokens: int | None = None,
                       **sampling) -> list:
        """Completions for several prompts, in their order.

        The prompts run in sub-batches, shortest first, each left-padded into one batch of at
        most ``max_batch_tokens`` (default :data:`~portable_infer.decode.generate.DEFAULT_BATCH_TOKENS`,
        8192) KV tokens: rows x min(context, longest prompt + max_new_tokens); a longer prompt
        runs alone. Results equal one-by-one runs (each row has its own seeded generator).
        """
        self.codec.require_tokenizer()
        params = self.params(**sampling)
        texts = [""] * len(prompts) if isinstance(prompts, (list, tuple)) else []
        for rows, dec in self._sub_batches(prompts, params, truncate, max_batch_tokens):
            streams = [self.codec.text_stream(params) for _ in rows]
            while not dec.done:
                for ev in dec.step():
                    piece, reason = streams[ev.row].piece(ev.token, ev.finish_reason)
                    texts[rows[ev.row]] += piece
                    if reason is not None and ev.finish_reason is None:  # a stop string
                        dec.finish(ev.row, "stop")
        return texts
