"""The per-token rule of one sequence: the one place every decode path picks a token.

``BatchDecoder`` (``generate.py``) and the scheduler (``running_batch.py``) both call
:meth:`Sequence.step` for each row and each token::

    logits ─ penalties ─ logit_bias ─┬───────────────────────── logprobs (of this distribution)
                                     └─ grammar mask ─ sampler ─ token   (or the argmax already
                                                                          taken on the device,
                                                                          under the grammar mask)
    token ─ stop id │ the grammar complete before it      -> "stop"
            │ max_new_tokens │ context (grammar complete: "stop") -> "length"
            └ grammar matcher: fed with the next step's mask fill, while the forward runs

A grammar is complete when its matcher allows only the end token: that step's token is the end
token (the model's first EOS, as llama.cpp and vLLM end a constrained reply), whatever the row's
stop ids, and the row stops there.

The context rule: a sequence ends ("length") when its prompt plus output fill ``max_context``
(its own length; ``full`` lets a caller whose padded batch cache is full end it earlier).
Logprobs describe the model's distribution after penalties and logit bias, before the grammar
mask (like vLLM's raw logprobs: a token forced by the grammar keeps the probability the model
gave it). What fails here (NaN logits, a grammar that refuses every token) raises; the caller
ends this sequence only.

A constrained row that samples the whole distribution (no top-k, top-p or min-p) draws first and
applies its mask only when the grammar refuses the draw, then draws again under it
(:attr:`Sequence.draws_first`): rejection sampling, an exact sample of the masked distribution.

Where the grammar mask is a row's first logit processor (:attr:`Sequence.mask_first`), callers
may apply it beforehand, for a whole batch in one call, or take the argmax under it on the
device (:mod:`portable_infer.decode.batch_pick`); the row then gets the masked logits
(``masked=True``) or the token.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from portable_infer.decode.constraints import consume
from portable_infer.decode.masks import allowed_tokens, allows, fill_masks
from portable_infer.errors import GenerationError, InvalidArgumentError
from portable_infer.decode.processors import LogitBias, apply_mask
from portable_infer.decode.draw import check_pick, rejection_draw
from portable_infer.decode.sampling import SamplingParams, apply_penalties, make_sampler, token_logprobs


@dataclass(frozen=True)
class Pick:
    """One token chosen by :meth:`Sequence.step`."""

    token: int
    finish_reason: str | None  # None while running; "stop" | "length"
    logprob: float | None = None
    top_logprobs: tuple = ()


class Sequence:
    """A prompt, its sampling state (seeded generator, sampler, stop ids, logit bias, grammar
    matcher) and its output so far.

    Args:
        prompt: the prompt's token ids.
        params: its :class:`SamplingParams`.
        eos_ids: the model's end tokens (unless ``params.ignore_eos``).
        vocab_size: the logits' width, to check ``logit_bias`` at once (None: at the first step).
        guide: a :class:`~portable_infer.decode.constraints.Guide` for the model, needed when
            ``params.constraint`` is set (its schema or grammar is compiled here: a bad one is an
            :class:`InvalidArgumentError` before anything runs).
    """

    def __init__(self, prompt: list, params: SamplingParams, *, eos_ids=(), vocab_size: int | None = None,
                 guide=None):
        self.prompt = prompt
        self.params = params
        self.rng = np.random.default_rng(params.seed)
        self.sampler = make_sampler(params)
        self.stop_ids = params.end_ids(eos_ids)
        self.bias = LogitBias(params.logit_bias, vocab_size) if params.logit_bias else None
        self.matcher = None
        self.mask_vocab = 0
        if params.constraint is not None:
            if guide is None:
                raise InvalidArgumentError("constrained decoding needs the package's tokenizer (tokenizer.json); "
                                           "this model has none", param=params.constraint.param)
            self.matcher = guide.matcher(params.constraint)
            self.mask_vocab = guide.vocab_size
        self.grammar_end = guide.eos_ids[0] if self.matcher is not None and guide.eos_ids else None
        self._unfed: int | None = None  # the token picked last, until the matcher is fed it
        self._broken: GenerationError | None = None  # the matcher refused a token fed on the worker
        self.output: list = []
        self.finish_reason: str | None = None

    @property
    def mask_first(self) -> bool:
        """A constrained row whose logits nothing changes or reads before the grammar mask (no
        penalty, no logit bias, no logprobs) and that does not draw first (:attr:`draws_first`):
        its mask may be applied to them beforehand."""
        p = self.params
        return (self.matcher is not None and not p.penalized and self.bias is None and p.logprobs is None
                and not self.draws_first)

    @property
    def draws_first(self) -> bool:
        """A constrained row sampling the whole distribution (``params.untruncated``): it draws
        from the unmasked logits and applies its mask only when the grammar refuses the draw,
        then draws again (rejection sampling: the token is an exact sample of the masked
        distribution, and the mask is rarely applied)."""
        return self.matcher is not None and self.params.untruncated

    def feed(self) -> None:
        """Feed the grammar matcher the token this row picked last. The next step's batched mask
        fill calls it while the forward runs (:class:`~portable_infer.decode.masks.MaskFill`), so
        the step does not wait on it; :meth:`step` calls it first in case no fill did. A refusal
        is kept and raised by the next :meth:`step` (this row only)."""
        tok, self._unfed = self._unfed, None
        if tok is not None:
            try:
                consume(self.matcher, tok)
            except GenerationError as exc:
                self._broken = exc

    def own_mask(self) -> np.ndarray:
        """This row's allowed tokens, computed alone (callers batch them:
        :class:`~portable_infer.decode.masks.MaskFill`)."""
        return allowed_tokens(fill_masks({0: self.matcher}, 1, self.mask_vocab)[0], self.mask_vocab)

    def step(self, logits: np.ndarray | None, tok: int | None = None, mask: np.ndarray | None = None,
             masked: bool = False, *, max_context: int, full: bool = False) -> Pick:
        """Pick, record and return the next token.

        Args:
            logits: this row's logits [vocab] (None when ``tok`` came from the device).
            tok: a token already picked as the argmax, under the grammar mask if the row has one
                (rows whose ``params.argmax_only`` holds).
            mask: this row's bitmask row from a batched fill (constrained rows; None: fill it here).
            masked: ``logits`` went through this row's grammar mask already (:attr:`mask_first` rows).
            max_context: the model's context; the sequence ends when it is full.
            full: the caller has no room for another token (a padded batch cache).
        """
        p = self.params
        stopped = False
        if self.matcher is not None:
            self.feed()
            if self._broken is not None:
                raise self._broken
            # the grammar was complete with the last token: its mask allows only the end token
            stopped = self.matcher.is_stopped()
            if stopped and self.grammar_end is not None:
                tok = self.grammar_end
        if tok is None:
            x = logits
            if p.penalized:
                x = apply_penalties(x, self.prompt, self.output, p)
            if self.bias is not None:
                x = self.bias(x)
            scored = x
            if self.matcher is not None:
                if x.shape[-1] != self.mask_vocab:
                    raise GenerationError(f"the logits have {x.shape[-1]} entries but the grammar's vocabulary "
                                          f"{self.mask_vocab}", reason="grammar")
                if not masked:
                    def allowed():  # this row's tokens: from the batch's fill, or filled here
                        return self.own_mask() if mask is None else allowed_tokens(mask, self.mask_vocab)
                    if self.draws_first:  # the draw stands where the grammar allows it
                        tok = rejection_draw(x, p.temperature, self.rng, allowed,
                                             None if mask is None else lambda t: allows(mask, t))
                    else:
                        x = apply_mask(x, allowed())
            if tok is None:
                tok = int(self.sampler(x, self.rng))
        else:
            scored = logits
            if logits is not None:
                check_pick(logits[tok])  # NaN / inf logits: a typed error, not a silent token
        lp, top = None, ()
        if p.logprobs is not None:
            lp, top = token_logprobs(scored, tok, p.logprobs)
            top = tuple(top)
        reason = None
        self.output.append(tok)
        if tok in self.stop_ids or stopped:
            reason = "stop"
        elif len(self.output) >= p.max_new_tokens or full or len(self.prompt) + len(self.output) >= max_context:
            reason = "length"
            if self.matcher is not None:  # the last token: fed now, for a grammar it completes
                consume(self.matcher, tok)
                reason = "stop" if self.matcher.is_stopped() else reason
        elif self.matcher is not None:
            self._unfed = tok  # fed by the next step's mask fill (or by that step itself)
        self.finish_reason = reason
        return Pick(tok, reason, lp, top)
