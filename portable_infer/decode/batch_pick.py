"""Where each row of a batch gets its next token: one decision per forward, for ``BatchDecoder``
and the scheduler's running batch alike.

::

    mode     when                                     the forward, and what comes to the host
    greedy   every row plain greedy, graph with       forward(greedy=True): one id per row
             next_token
    check    every row greedy, some constrained        forward_on_device: the graph's own argmax, one
             (argmax_only), graph with next_token     id per row; the constrained rows whose grammar
                                                      refuses their argmax get the argmax under their
                                                      masks: one lean companion run on the device for
                                                      those rows (masks_on_device), or their logits
                                                      to the host
    sample   engine.samples_on_device, some row       forward_on_device, then one companion run on the
             samples with nothing else reading its    device: those rows' tokens drawn there, one
             logits (SamplingParams.drawn_plain)      uniform number each up and one id back; plain
                                                      greedy rows take the graph's argmax; the other
                                                      rows' logits (and only theirs) come to the host
                                                      and are picked as in host mode
    device   engine.masks_on_device, DEVICE_MIN_ROWS   forward_on_device, then one companion run on the
             live rows or more, some row greedy       device: the grammar masks applied there, each
             (maybe constrained) or with a grammar    row's argmax, and the (masked) logits of the rows
             mask it may take first                   that still need theirs: sampling, logprobs,
                                                      penalties, logit bias
    host     otherwise                                forward(): every row's logits; the masks of the
                                                      mask-first rows applied in one numpy call

A row's grammar mask is applied before :meth:`Sequence.step
<portable_infer.decode.sequence.Sequence.step>` only where it is the row's first logit processor
(:attr:`Sequence.mask_first <portable_infer.decode.sequence.Sequence.mask_first>`); other
constrained rows get their logits as they are and their bitmask row. Greedy rows are checked
first, as llama.cpp's sampler does: where the grammar allows the plain argmax, that argmax is
the masked one (the first index among the largest logits either way), so the mask is applied only
to the rows whose grammar refuses it. Either way the token goes
through ``Sequence.step``, the one home of the per-token rule, with the row's :class:`RowInput`.

A row that samples on an engine that draws on its device is drawn there in every step, whatever
the other rows of its batch: its draws do not depend on the batch it is in (a seeded request
gives the same tokens alone or among others), and each takes one number from the row's
generator, as the host's draw does.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from portable_infer.decode.masks import MaskFill, allowed_tokens, allows, allows_each, forced_tokens
from portable_infer.decode.processors import apply_mask
from portable_infer.decode.sampling import draw_filters

GREEDY, CHECK, SAMPLE, DEVICE, HOST = "greedy", "check", "sample", "device", "host"
# Fewer live rows than this take the host path even where the engine masks on the device: the
# companion run costs a fixed ~0.15-0.3 ms on CUDA, more than fetching and masking a few rows'
# logits (H200, SmolLM2 shape, greedy JSON schema: batch 1 host +11 % against device +16-26 %;
# batch 16 host +129 % against device +31 %; docs/benchmarks.md, Session 10).
DEVICE_MIN_ROWS = 4


class RowInput(NamedTuple):
    """One row's arguments to :meth:`Sequence.step <portable_infer.decode.sequence.Sequence.step>`
    (a tuple: every row of every step makes one)."""

    logits: np.ndarray | None = None
    tok: int | None = None
    mask: np.ndarray | None = None  # its bitmask row, for the step to apply
    masked: bool = False  # logits went through its grammar mask already

    def step(self, seq, **kw):
        """``seq.step`` with these arguments (``kw``: max_context, full)."""
        return seq.step(self.logits, self.tok, self.mask, self.masked, **kw)


def mode(engine, seqs: list) -> str:
    """How the next forward of rows ``seqs`` runs (None for a row that picks nothing: it ended)."""
    live = [s for s in seqs if s is not None]
    if engine.greedy_on_device and all(s.params.plain_greedy for s in live):
        return GREEDY
    if engine.greedy_on_device and all(s.params.argmax_only for s in live):
        return CHECK
    if engine.samples_on_device and any(s.params.drawn_plain for s in live):
        return SAMPLE
    if (engine.masks_on_device and len(live) >= DEVICE_MIN_ROWS
            and any(s.params.argmax_only or s.mask_first for s in live)):
        return DEVICE
    return HOST


def overlaps(engine, how: str, seqs: list) -> bool:
    """A step in mode ``how`` (:func:`mode`) whose tokens need nothing from the host: every live
    row plain greedy (the graph's argmax) or drawn on the device. Its tokens may feed the next
    forward before the host has looked at them (the batches' async scheduling, as vLLM's)."""
    if how == GREEDY:
        return True
    return how == SAMPLE and engine.greedy_on_device and all(
        s.params.plain_greedy or s.params.drawn_plain for s in seqs if s is not None)


def device_picks(how: str, out, seqs: list) -> tuple:
    """``(tokens [B] int64, inputs)`` of a forward in mode ``how`` where :func:`overlaps` holds:
    each row's next input token and its :class:`RowInput` (None for rows in ``seqs`` that are
    None). A drawn row whose logits cannot be sampled gets its logits (its step raises the
    host's error) and token 0."""
    if how == GREEDY:
        tokens = np.asarray(out, np.int64).reshape(-1)
        return tokens, [None if s is None else RowInput(tok=t) for s, t in zip(seqs, tokens.tolist())]
    inputs = _sampled_inputs(out, seqs, None)
    tokens = np.fromiter((0 if i is None or i.tok is None else i.tok for i in inputs), np.int64, len(inputs))
    return tokens, inputs


def mask_fill(engine, how: str, seqs: list) -> MaskFill:
    """The grammar masks of rows ``seqs`` for a forward in mode ``how``: filled while it runs, on
    the caller's thread where the engine's device computes it meanwhile (check and device modes
    on an engine that ``overlaps_host``), else on the worker thread."""
    return MaskFill.of(seqs, inline=how in (CHECK, DEVICE) and getattr(engine, "overlaps_host", False))


def forward(engine, how: str, ids: np.ndarray, mask: np.ndarray, cache, fill: MaskFill | None = None):
    """The engine's forward for mode ``how``: token ids, device logits, or host logits; ``fill``
    (:func:`mask_fill`) runs while the device computes where it can."""
    if how == GREEDY:
        return engine.forward(ids, mask, cache, greedy=True)
    if how in (CHECK, SAMPLE, DEVICE):
        return engine.forward_on_device(ids, mask, cache, meanwhile=None if fill is None else fill.run)
    return engine.forward(ids, mask, cache)


def row_inputs(how: str, out, seqs: list, masks: np.ndarray | None) -> list:
    """Each row's :class:`RowInput` from the forward's output ``out`` (None for rows in ``seqs``
    that are None); ``masks`` the batch's grammar bitmask (None: no row constrained)."""
    if how == GREEDY:
        return [None if s is None else RowInput(tok=t) for s, t in zip(seqs, out.tolist())]
    if how == CHECK:
        return _checked_inputs(out, seqs, masks)
    if how == DEVICE:
        return _device_inputs(out, seqs, masks)
    if how == SAMPLE:
        return _sampled_inputs(out, seqs, masks)
    live = [i for i, s in enumerate(seqs) if s is not None]
    argmax = out.argmax(axis=-1) if any(seqs[i].params.argmax_only for i in live) else None
    first = [i for i in live if seqs[i].mask_first] if masks is not None else []
    # greedy constrained rows whose grammar allows the plain argmax: that is the masked argmax
    taken = {i for i in first if seqs[i].params.argmax_only and allows(masks[i], int(argmax[i]))}
    first = [i for i in first if i not in taken]
    masked = {}
    if first:  # one call for the batch (every row: no copy of the logits first)
        rows = out if len(first) == len(out) else out[first]
        masked = dict(zip(first, apply_mask(rows, allowed_tokens(masks[first], out.shape[-1]))))
    inputs = [None] * len(seqs)
    for i in live:
        s = seqs[i]
        if s.params.plain_greedy or i in taken:
            inputs[i] = RowInput(out[i], int(argmax[i]))
        elif i in masked:
            inputs[i] = RowInput(masked[i], masked=True)
        else:
            inputs[i] = RowInput(out[i], mask=None if s.matcher is None else masks[i])
    return inputs


def _checked_inputs(out, seqs: list, masks: np.ndarray | None) -> list:
    """CHECK mode: every row takes the graph's argmax, but a constrained row whose grammar refuses
    it, which takes the argmax under its mask (on the device where the engine masks there)."""
    tokens = out.argmax()
    inputs = [None if s is None else RowInput(tok=t) for s, t in zip(seqs, tokens.tolist())]
    checked = []
    for i, s in enumerate(seqs):
        if s is None or s.matcher is None:
            continue
        if s.mask_vocab == out.vocab:
            checked.append(i)
        else:  # the logits go to the row's step, which refuses the mismatch (this row only)
            inputs[i] = RowInput(out.rows([i])[0])
    # no constrained row left (one ended last step): no masks were filled, nothing to check
    checked = np.array(checked, np.int64)
    refused = checked[~allows_each(masks, checked, tokens[checked])].tolist() if checked.size else []
    if refused:  # a token the grammar forces is the masked argmax: no logits needed
        forced = forced_tokens(masks[refused])
        for i, tok in zip(refused, forced.tolist()):
            if tok >= 0:
                inputs[i] = RowInput(tok=tok)
        refused = [i for i, tok in zip(refused, forced) if tok < 0]
    if refused:  # the others: one lean companion run on the device, or their logits here
        allowed = allowed_tokens(masks[refused], out.vocab)
        picked = out.pick_rows(refused, allowed) if out.masks_here else \
            apply_mask(out.rows(refused), allowed).argmax(-1)
        for i, tok in zip(refused, picked):
            inputs[i] = RowInput(tok=int(tok))
    return inputs


def _device_inputs(out, seqs: list, masks: np.ndarray | None) -> list:
    """DEVICE mode: argmax rows get their token; the others their logits, masked on the device
    where the mask comes first (the bitmask of other constrained rows goes up as all ones)."""
    fetch = [i for i, s in enumerate(seqs) if s is not None and not s.params.argmax_only]
    raw = [i for i in fetch if seqs[i].matcher is not None and not seqs[i].mask_first]
    upload = masks
    if raw:
        upload = masks.copy()
        upload[raw] = -1
    tokens, logits = out.pick(upload, fetch)
    inputs = [None if s is None else RowInput(tok=int(tokens[i])) for i, s in enumerate(seqs)]
    for k, i in enumerate(fetch):
        s = seqs[i]
        if s.mask_first:
            inputs[i] = RowInput(logits[k], masked=True)
        else:
            inputs[i] = RowInput(logits[k], mask=None if s.matcher is None else masks[i])
    return inputs


def _sampled_inputs(out, seqs: list, masks: np.ndarray | None) -> list:
    """SAMPLE mode: the sampling rows drawn on the device (one uniform number each from the row's
    generator); plain greedy rows take the graph's argmax; the rest, and a drawn row whose logits
    cannot be sampled (its step raises the host's typed error), get their logits as host mode
    gives them."""
    live = [i for i, s in enumerate(seqs) if s is not None]
    drawn = [i for i in live if seqs[i].params.drawn_plain]
    greedy = [i for i in live if seqs[i].params.plain_greedy]
    argmax = out.argmax() if greedy else None  # (a device's argmax crosses only where a row takes it)
    if argmax is None:
        greedy = []
    inputs = [None] * len(seqs)
    failed = []
    if not drawn:  # (the rows that draw ended: a BatchDecoder keeps its mode)
        tokens = np.empty(0, np.int64)
    else:
        u = np.fromiter((seqs[i].rng.random() for i in drawn), np.float64, len(drawn))
        tokens = out.sample(drawn, draw_filters([seqs[i].params for i in drawn]), u)
    for i, tok in zip(drawn, tokens.tolist()):
        if tok >= 0:
            inputs[i] = RowInput(tok=tok)
        else:
            failed.append(i)
    for i in greedy:
        inputs[i] = RowInput(tok=int(argmax[i]))
    host = sorted(set(live) - set(drawn) - set(greedy)) + failed
    if host:
        own = row_inputs(HOST, out.rows(host), [seqs[i] for i in host], None if masks is None else masks[host])
        for i, inp in zip(host, own):
            inputs[i] = inp
    return inputs
