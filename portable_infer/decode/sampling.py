"""Token sampling: pure functions from logits to a token id.

The pipeline, with vLLM / OpenAI semantics::

    logits ── apply_penalties ──┬── temperature == 0 ──────────────────────────── argmax
                                └── / temperature ─ top_k ─ top_p ─ min_p ─ draw(rng)

Each filter takes a 1-D float array and returns an array whose dropped entries are ``-inf``; a
filter that is switched off returns its input unchanged (never mutated). The random generator is
always passed in, so a seed reproduces a run exactly.

Logits that cannot be sampled (NaN, +inf, or every one -inf) raise :class:`GenerationError`
naming the cause; values the request chose that overflow float32 raise
:class:`InvalidArgumentError` naming the parameter. Neither is an ``assert``: the scheduler ends
that one request with the error and the others in its step go on.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np

from portable_infer.errors import InvalidArgumentError
from portable_infer.decode.draw import as_logits, check_pick, draw, finite_max, tempered
from portable_infer.decode.processors import check_logit_bias, openai_spellings

if TYPE_CHECKING:
    from portable_infer.decode.constraints import Constraint

MAX_LOGPROBS = 20
_TOP_P_CANDIDATES = 1024  # top_p sorts only these best tokens when they hold >= top_p of the mass
# Temperatures below this are greedy decoding (stored as 0.0), as in vLLM: logits / 1e-300
# overflows float32, and below 1e-5 sampling is argmax in all but name.
MIN_TEMPERATURE = 1e-5
# Repetition penalties outside this range overflow (or flatten) float32 logits and mean nothing.
REPETITION_PENALTY_RANGE = (0.01, 100.0)

Sampler = Callable[[np.ndarray, np.random.Generator], int]

# name -> (allowed range as written in the error, predicate, how to switch it off / fix it)
_FLOAT_RULES: dict[str, tuple[str, Callable[[float], bool], str]] = {
    "temperature": (">= 0", lambda v: v >= 0, "use 0 for greedy decoding"),
    "top_p": ("in (0, 1]", lambda v: 0 < v <= 1, "use 1 to turn top-p off"),
    "min_p": ("in [0, 1)", lambda v: 0 <= v < 1, "use 0 to turn min-p off"),
    "repetition_penalty": (f"in [{REPETITION_PENALTY_RANGE[0]}, {REPETITION_PENALTY_RANGE[1]:g}]",
                           lambda v: REPETITION_PENALTY_RANGE[0] <= v <= REPETITION_PENALTY_RANGE[1],
                           "use 1 to turn it off"),
    "presence_penalty": ("in [-2, 2]", lambda v: -2 <= v <= 2, "use 0 to turn it off"),
    "frequency_penalty": ("in [-2, 2]", lambda v: -2 <= v <= 2, "use 0 to turn it off"),
}
# name -> (allowed, predicate, fix, None allowed)
_INT_RULES: dict[str, tuple[str, Callable[[int], bool], str, bool]] = {
    "top_k": (">= 0", lambda v: v >= 0, "use 0 to turn top-k off", False),
    "max_new_tokens": (">= 1", lambda v: v >= 1, "ask for at least one token", False),
    "seed": (">= 0", lambda v: v >= 0, "use None for a random seed", True),
    "logprobs": (f"in [0, {MAX_LOGPROBS}]", lambda v: 0 <= v <= MAX_LOGPROBS, "use None to turn it off", True),
}
# name -> (element predicate, what the elements must be, element converter)
_TUPLE_RULES: dict[str, tuple[Callable[[object], bool], str, type]] = {
    "stop": (lambda s: isinstance(s, str) and s != "", "non-empty strings", str),
    "stop_token_ids": (lambda i: _is_int(i) and i >= 0, "ints >= 0", int),
}


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token; validated at construction.

    ``temperature == 0`` is greedy decoding, and so is any temperature below
    :data:`MIN_TEMPERATURE` (1e-5): it is stored as 0.0, the same rule for the Python API and the
    server (which builds its SamplingParams here), because ``logits / temperature`` overflows
    float32 for tiny values and sampling below 1e-5 is an argmax anyway. ``top_k == 0``,
    ``top_p == 1``, ``min_p == 0`` and neutral penalties switch those steps off;
    ``repetition_penalty`` is in [0.01, 100] (further out it overflows or flattens the logits),
    presence and frequency penalties in [-2, 2]. ``logprobs``: None = off, 0 = the chosen token's
    log-probability only, k = also the k most likely alternatives (at most 20). ``stop`` holds
    stop strings and ``stop_token_ids`` extra end tokens; lists are accepted and stored as tuples.
    ``constraint``: a :class:`~portable_infer.decode.constraints.Constraint` (JSON schema, JSON object,
    regex, Lark grammar; or a dict such as ``{"regex": "[0-9]+"}``, or an OpenAI response_format)
    that the output must follow; ``logit_bias``: ``{token id: bias in [-100, 100]}`` added to the
    logits (stored as sorted pairs). ``from_kwargs`` also takes OpenAI's spellings
    ``response_format=`` and ``logprobs=True, top_logprobs=k``.
    Example: ``SamplingParams(temperature=0.7, top_p=0.9, seed=0, stop=["\\n\\n"])``.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_new_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    logprobs: int | None = None
    ignore_eos: bool = False
    constraint: Constraint | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        for name, (allowed, ok, fix) in _FLOAT_RULES.items():
            value = getattr(self, name)
            real = _is_int(value) or isinstance(value, (float, np.floating))
            if not (real and math.isfinite(value) and ok(value)):
                raise InvalidArgumentError(f"{name} must be {allowed}, got {value!r}; {fix}", param=name)
            object.__setattr__(self, name, float(value))
        if self.temperature < MIN_TEMPERATURE:
            object.__setattr__(self, "temperature", 0.0)  # greedy: see the class docstring
        for name, (allowed, ok, fix, optional) in _INT_RULES.items():
            value = getattr(self, name)
            if value is None and optional:
                continue
            if not (_is_int(value) and ok(value)):
                none = "None or " if optional else ""
                raise InvalidArgumentError(f"{name} must be {none}an int {allowed}, got {value!r}; {fix}",
                                           param=name)
            object.__setattr__(self, name, int(value))
        for name, (ok, what, convert) in _TUPLE_RULES.items():
            value = getattr(self, name)
            if not (isinstance(value, (list, tuple)) and all(ok(v) for v in value)):
                raise InvalidArgumentError(f"{name} must be a tuple or list of {what}, got {value!r}", param=name)
            object.__setattr__(self, name, tuple(convert(v) for v in value))
        if not isinstance(self.ignore_eos, bool):
            raise InvalidArgumentError(f"ignore_eos must be True or False, got {self.ignore_eos!r}", param="ignore_eos")
        from portable_infer.decode.constraints import Constraint  # no llguidance import: that waits for the first matcher

        object.__setattr__(self, "constraint", Constraint.coerce(self.constraint))
        object.__setattr__(self, "logit_bias", check_logit_bias(self.logit_bias))

    @cached_property  # read for every row at every step; the fields never change
    def penalized(self) -> bool:
        """Repetition, presence or frequency penalties change the logits before sampling."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def end_ids(self, eos_ids=()) -> frozenset:
        """The token ids that end a sequence: ``stop_token_ids``, plus the model's ``eos_ids``
        unless ``ignore_eos``."""
        return frozenset(self.stop_token_ids) | (frozenset() if self.ignore_eos else frozenset(eos_ids))

    def silent_end_ids(self, eos_ids=()) -> frozenset:
        """The tokens that add no text when they end a sequence ("stop"): ``stop_token_ids`` and
        the model's ``eos_ids``, ``ignore_eos`` or not (a complete grammar ends on the first one;
        vLLM leaves stop tokens out of the text)."""
        return frozenset(self.stop_token_ids) | frozenset(eos_ids)

    @cached_property
    def argmax_only(self) -> bool:
        """The token is the argmax of the logits under the grammar mask (if any), and nothing else
        reads them (no penalty, no logprobs, no logit bias): it may be picked where the logits are."""
        return self.temperature == 0.0 and not self.penalized and self.logprobs is None and not self.logit_bias

    @cached_property
    def untruncated(self) -> bool:
        """Sampling from the whole (tempered) distribution: no top-k, top-p or min-p cut. Then a
        draw the grammar refuses may be drawn again under the mask: an exact sample of the masked
        distribution (rejection; ``Sequence.step``)."""
        return self.temperature > 0.0 and self.top_k == 0 and self.top_p == 1.0 and self.min_p == 0.0

    @cached_property
    def drawn_plain(self) -> bool:
        """A sampled row (temperature > 0) whose logits nothing changes or reads but its
        temperature and filters (no penalty, logit bias, logprobs or constraint): the draw may
        run where the logits are (:func:`draw_filters`)."""
        return (self.temperature > 0.0 and not self.penalized and self.logprobs is None and not self.logit_bias
                and self.constraint is None)

    @cached_property
    def plain_greedy(self) -> bool:
        """:attr:`argmax_only` without a constraint: the graph's own argmax (``next_token``) will do."""
        return self.argmax_only and self.constraint is None

    @classmethod
    def from_kwargs(cls, defaults: SamplingParams | None = None, **kw) -> SamplingParams:
        """``defaults`` (or the class defaults) with the fields in ``kw`` replaced.

        Unknown keys raise :class:`InvalidArgumentError` listing the valid ones. Example:
        ``SamplingParams.from_kwargs(temperature=0.8, top_k=40)``.
        """
        if defaults is not None and not isinstance(defaults, SamplingParams):
            raise InvalidArgumentError(f"defaults must be a SamplingParams or None, got {type(defaults).__name__}")
        kw = openai_spellings(kw)
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(kw) - set(valid))
        if unknown:
            raise InvalidArgumentError(f"unknown sampling parameter(s): {', '.join(unknown)}; "
                                       f"valid ones are: {', '.join(valid)}", param=unknown[0])
        return dataclasses.replace(defaults if defaults is not None else cls(), **kw)


def draw_filters(params: Sequence[SamplingParams]) -> dict:
    """The sampler's settings of ``n`` rows as arrays, for a draw on the device (the rule of
    :func:`make_sampler`): ``temperature`` [n] float32 (> 0), ``top_k`` [n] int64 (0: off),
    ``top_p`` [n] float64 (1: off), ``log_min_p`` [n] float32 (``log(min_p)`` as the host adds
    it, -inf where min-p is off)."""
    return {"temperature": np.array([p.temperature for p in params], np.float32),
            "top_k": np.array([p.top_k for p in params], np.int64),
            "top_p": np.array([p.top_p for p in params], np.float64),
            "log_min_p": np.array([math.log(p.min_p) if p.min_p > 0 else -np.inf for p in params], np.float32)}


def _as_ids(ids, vocab: int, name: str) -> np.ndarray:
    arr = np.asarray(ids, dtype=np.int64).reshape(-1)
    if arr.size and (arr.min() < 0 or arr.max() >= vocab):
        bad = arr[(arr < 0) | (arr >= vocab)][0]
        raise InvalidArgumentError(f"{name} must hold token ids in [0, {vocab}), got {bad}")
    return arr


def apply_penalties(logits: np.ndarray, prompt_ids: Sequence[int], output_ids: Sequence[int],
                    params: SamplingParams) -> np.ndarray:
    """Return a penalized copy of ``logits`` [vocab] (vLLM semantics).

    The repetition penalty applies to every token seen in the prompt or the output: positive
    logits are divided by it, negative ones multiplied. Presence and frequency penalties apply to
    output tokens only: ``logit -= presence * (count > 0) + frequency * count``.

    Example:
        >>> apply_penalties(np.array([2.0, -1.0, 1.0]), [0], [1], SamplingParams(repetition_penalty=2.0))
        array([ 1., -2.,  1.])
    """
    x = as_logits(logits)
    out = x.astype(np.promote_types(x.dtype, np.float32))  # a copy; float32 stays float32
    vocab = out.shape[0]
    output = _as_ids(output_ids, vocab, "output_ids")
    if params.repetition_penalty != 1.0:
        seen = np.unique(np.concatenate((_as_ids(prompt_ids, vocab, "prompt_ids"), output)))
        values = out[seen]
        with np.errstate(over="ignore"):
            penalized = np.where(values > 0, values / params.repetition_penalty, values * params.repetition_penalty)
        if np.isinf(penalized).any() and not np.isinf(values).any():
            raise InvalidArgumentError(
                f"repetition_penalty {params.repetition_penalty} overflows these logits (largest "
                f"{np.abs(values).max():.4g}) past float32; use a value closer to 1", param="repetition_penalty")
        out[seen] = penalized
    if (params.presence_penalty or params.frequency_penalty) and output.size:
        ids, counts = np.unique(output, return_counts=True)
        out[ids] -= params.presence_penalty + params.frequency_penalty * counts
    return out


def log_softmax(x: np.ndarray) -> np.ndarray:
    """Numerically stable ``log(softmax(x))`` of a 1-D array as float64; ``-inf`` stays ``-inf``."""
    x = as_logits(x)
    shifted = x.astype(np.promote_types(x.dtype, np.float32), copy=False) - finite_max(x)
    # exp in the input precision (float32 exp is several times faster), the sum in float64
    return shifted.astype(np.float64) - np.log(np.exp(shifted).sum(dtype=np.float64))


def apply_top_k(logits: np.ndarray, k: int) -> np.ndarray:
    """Keep the ``k`` largest logits (ties with the k-th are kept); ``k == 0`` is off."""
    if k <= 0 or k >= logits.shape[0]:
        return logits
    kth = logits[np.argpartition(logits, -k)[-k]]  # O(vocab) selection, no full sort
    return np.where(logits >= kth, logits, -np.inf)


def apply_top_p(logits: np.ndarray, p: float) -> np.ndarray:
    """Keep the smallest set of most likely tokens whose probability sums to >= ``p`` (at least one).

    ``p == 1`` is off. Tokens already at ``-inf`` are ignored, so after top-k only k values are
    sorted. Of equally likely tokens the lower index comes first (as the device's TopK orders
    them: ``graphs/sample.onnx`` keeps the same set).
    """
    if p >= 1.0:
        return logits
    cand = np.flatnonzero(logits > -np.inf)
    values = logits[cand]
    weights = np.exp(values - values.max())
    total = weights.sum(dtype=np.float64)  # sums in float64: a float32 running sum over 100k flat weights drifts
    if cand.size > _TOP_P_CANDIDATES:
        floor = values[np.argpartition(values, -_TOP_P_CANDIDATES)[-_TOP_P_CANDIDATES]]
        best = np.flatnonzero(values >= floor)  # every token tied with the last one too: order by index holds
        if weights[best].sum(dtype=np.float64) >= p * total:  # then the kept set lies inside `best`
            cand, values, weights = cand[best], values[best], weights[best]
    order = np.argsort(-values, kind="stable")  # most likely first, ties by index (cand ascends): the device's TopK order
    cdf = np.cumsum(weights[order], dtype=np.float64) / total
    n_keep = min(int(np.searchsorted(cdf, p, side="left")) + 1, cand.size)
    keep = cand[order[:n_keep]]
    out = np.full_like(logits, -np.inf)
    out[keep] = logits[keep]
    return out


def apply_min_p(logits: np.ndarray, min_p: float) -> np.ndarray:
    """Drop tokens whose probability is below ``min_p`` times the top probability; 0 is off."""
    if min_p <= 0.0:
        return logits
    threshold = logits.max() + math.log(min_p)  # p_i < min_p * p_max  <=>  x_i < x_max + log(min_p)
    return np.where(logits >= threshold, logits, -np.inf)


def make_sampler(params: SamplingParams) -> Sampler:
    """Return ``sampler(logits, rng) -> token id`` for ``params`` (penalties are applied before).

    Greedy (``temperature == 0``) is an argmax and does not touch ``rng``. NaN or +inf logits, or
    a row that is all -inf, raise :class:`GenerationError` (see :func:`unsampleable`).
    Example: ``make_sampler(SamplingParams(temperature=0.7))(logits, np.random.default_rng(0))``.
    """
    if not isinstance(params, SamplingParams):
        raise InvalidArgumentError(f"params must be a SamplingParams, got {type(params).__name__}")
    if params.temperature == 0.0:
        def greedy(logits: np.ndarray, rng: np.random.Generator) -> int:
            x = as_logits(logits)
            i = int(np.argmax(x))
            check_pick(x[i])
            return i
        return greedy

    temperature, top_k, top_p, min_p = params.temperature, params.top_k, params.top_p, params.min_p

    def sampler(logits: np.ndarray, rng: np.random.Generator) -> int:
        x = apply_min_p(apply_top_p(apply_top_k(tempered(logits, temperature), top_k), top_p), min_p)
        return draw(x, rng)
    return sampler


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """Pick one token id from ``logits`` [vocab]; see :func:`make_sampler` for the pipeline."""
    return make_sampler(params)(logits, rng)


def token_logprobs(logits: np.ndarray, token_id: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """Log-probability of ``token_id`` and the ``k`` most likely ``(id, logprob)``, best first.

    Computed from the raw (penalized) logits, before temperature and filters, like OpenAI.
    Example: ``token_logprobs(np.log([.1, .2, .3, .4]), 2, 2)`` is ``(log .3, [(3, log .4), (2, log .3)])``.
    """
    lp = log_softmax(logits)
    if not (_is_int(token_id) and 0 <= token_id < lp.size):
        raise InvalidArgumentError(f"token_id must be an int in [0, {lp.size}), got {token_id!r}")
    if not (_is_int(k) and 0 <= k <= MAX_LOGPROBS):
        raise InvalidArgumentError(f"k must be an int in [0, {MAX_LOGPROBS}], got {k!r}")
    k = min(int(k), lp.size)
    top = np.argpartition(lp, -k)[-k:] if k else np.empty(0, np.int64)
    top = top[np.argsort(-lp[top], kind="stable")]
    return float(lp[token_id]), [(int(i), float(lp[i])) for i in top]
