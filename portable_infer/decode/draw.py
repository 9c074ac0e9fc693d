"""From logits to one token id: the checks a draw needs, temperature, and the draws themselves.

``draw`` samples ``softmax(logits)`` with one uniform number (an inverse CDF in two levels);
``rejection_draw`` samples it over the tokens a grammar allows, drawing from every token first
and, only where the grammar refuses the draw, again from the same weights with the refused
tokens zeroed. Logits that cannot be sampled (NaN, +inf, or every one -inf) raise
:func:`unsampleable`'s :class:`GenerationError`; a temperature that overflows them an
:class:`InvalidArgumentError` naming it. The filters and :class:`SamplingParams` live in
:mod:`portable_infer.decode.sampling`, which builds its samplers on these.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from portable_infer.errors import GenerationError, InvalidArgumentError

_DRAW_BLOCK = 256  # draw() picks a block of this many tokens, then a token in it


def as_logits(logits) -> np.ndarray:
    """``logits`` as an array, refused unless it is 1-D [vocab] and not empty."""
    x = np.asarray(logits)
    if x.ndim != 1 or x.size == 0:
        raise InvalidArgumentError(f"logits must be a non-empty 1-D array [vocab], got shape {x.shape}")
    return x


def unsampleable(top: float) -> GenerationError:
    """The error for logits whose maximum ``top`` is not finite: NaN anywhere makes the max NaN,
    +inf anywhere makes it +inf, and it is -inf only when every logit is."""
    if np.isnan(top):
        return GenerationError("the model's logits hold NaN: its output is broken for this input, not the "
                               "request's values; check the package (re-export it, or try another variant "
                               "or precision)", reason="nan_logits")
    if top > 0:
        return GenerationError("the model's logits hold +inf (an overflow in the graph, e.g. fp16 "
                               "activations): try an fp32 or int4 package or another variant",
                               reason="inf_logits")
    return GenerationError("every logit is -inf: no token is left to choose (all of them were "
                           "filtered out)", reason="no_candidates")


def finite_max(x: np.ndarray) -> float:
    """The largest logit; :func:`unsampleable`'s error where it is not finite."""
    top = x.max()
    if not np.isfinite(top):
        raise unsampleable(top)
    return top


def check_pick(value) -> None:
    """Raise :func:`unsampleable`'s error when a greedy pick (an argmax) landed on a non-finite
    logit: NumPy's argmax returns the first NaN, and +inf or an all -inf row mean no real choice."""
    if not np.isfinite(value):
        raise unsampleable(value)


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    """``logits / temperature`` (> 0; 0 is greedy, handled before), float32 or wider."""
    x = np.asarray(logits)
    return x.astype(np.promote_types(x.dtype, np.float32), copy=False) / temperature


def _pick(cdf: np.ndarray, weights: np.ndarray, u: float) -> int:
    """Index ``i`` with ``cdf[i-1] <= u < cdf[i]``, never one of zero weight (u may round up)."""
    i = int(np.searchsorted(cdf, u, side="right"))
    return i if i < cdf.size and weights[i] > 0 else int(np.flatnonzero(weights)[-1])


def draw(logits: np.ndarray, rng: np.random.Generator) -> int:
    """Draw one token id from ``softmax(logits)`` with one uniform number from ``rng``."""
    return draw_weighted(softmax_weights(logits), rng)


def softmax_weights(logits: np.ndarray) -> np.ndarray:
    """``exp(logits - max)`` as a new float32 (or wider) array: softmax's weights, unnormalised."""
    x = np.asarray(logits)
    weights = x.astype(np.promote_types(x.dtype, np.float32), copy=False) - finite_max(x)  # a new array
    np.exp(weights, out=weights)  # in place: one vocab-sized temporary, not two
    return weights


def draw_weighted(weights: np.ndarray, rng: np.random.Generator) -> int | None:
    """Draw index ``i`` with probability ``weights[i] / weights.sum()`` (weights >= 0) with one
    uniform number from ``rng``; None (and ``rng`` untouched) when every weight is 0.

    Inverse CDF in two levels (block, then token): a cumsum over the whole vocabulary is
    sequential and would cost several times the rest of the step.
    """
    block_sums = np.add.reduceat(weights, np.arange(0, weights.size, _DRAW_BLOCK), dtype=np.float64)
    block_cdf = np.cumsum(block_sums)
    if not block_cdf[-1] > 0:
        return None
    u = rng.random() * block_cdf[-1]
    block = _pick(block_cdf, block_sums, u)
    u -= block_cdf[block - 1] if block else 0.0
    inner = weights[block * _DRAW_BLOCK:(block + 1) * _DRAW_BLOCK]
    return block * _DRAW_BLOCK + _pick(np.cumsum(inner, dtype=np.float64), inner, u)


def tempered(logits, temperature: float) -> np.ndarray:
    """``logits / temperature`` for a draw, checked: a NaN or +inf in the logits, or every one
    -inf, is :func:`unsampleable`'s error; a temperature that overflows them
    :func:`temperature_overflow`'s (checked here: they would fail obscurely in the filters)."""
    raw = as_logits(logits)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        x = apply_temperature(raw, temperature)
    if not np.isfinite(x.max()):
        raise temperature_overflow(raw, temperature)
    return x


def temperature_overflow(x: np.ndarray, temperature: float) -> Exception:
    """Why ``x / temperature`` has no finite maximum: the logits themselves, or the division."""
    top = x.max()
    if not np.isfinite(top):
        return unsampleable(top)
    return InvalidArgumentError(f"temperature {temperature!r} is too small for these logits (largest {top:.4g}): "
                                f"logits / temperature overflows float32; use a larger temperature or 0 "
                                f"(greedy)", param="temperature")


def rejection_draw(logits: np.ndarray, temperature: float, rng: np.random.Generator,
                   allowed: Callable[[], np.ndarray], accepts: Callable[[int], bool] | None = None) -> int:
    """A draw from ``softmax(logits / temperature)`` over the tokens ``allowed()`` gives (bool
    [vocab]), by rejection: a draw from every token stands where ``accepts(token)`` (or, without
    it, ``allowed()``) takes it; else the same weights, the refused tokens zeroed, give a second
    draw. Exact for the masked distribution, and the weights (the costly part) are computed once.
    With ``accepts``, ``allowed()`` is called only for a refused draw.

    The untruncated sampler's checks hold (``make_sampler``: NaN / inf logits, a temperature
    that overflows); where every allowed token's weight underflows to 0 beside the best refused
    one, the allowed tokens are drawn from their own softmax (no_candidates when there is none).
    """
    x = tempered(logits, temperature)
    weights = softmax_weights(x)
    tok = draw_weighted(weights, rng)
    if accepts is not None and accepts(tok):
        return tok
    keep = allowed()
    if accepts is None and keep[tok]:
        return tok
    weights *= keep  # refused tokens to 0, in place
    tok = draw_weighted(weights, rng)
    return draw(np.where(keep, x, -np.inf), rng) if tok is None else tok
