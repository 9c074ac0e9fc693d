"""Verification without torch: shipped reference logits, and the package's graphs against each other.

``verify_export`` runs the full check (``verify.py``, against transformers) when torch and
transformers are installed, and this one otherwise, so a first run needs only the ``[lean]`` extra.

    source with shipped references          any other source
    (references.py, by sha256)             (no reference outside the package)
    ----------------------------------      ---------------------------------------------
    the reference's greedy continuation     the portable graph's greedy continuation
    (verify.quality's 128 steps), the       (LAST_STEPS), the others teacher-forced on it
    fixed texts' perplexity and top-k
    logits at every position

Graphs with logits for every position (portable) are checked on the whole reference in one pass:
teacher-forced top-1 agreement and perplexity ("quality", the numbers the full check records) and
top-k logits. Graphs that return the last position only run token by token, so they are checked
on the prompt and the first LAST_STEPS greedy steps ("agreement": never read by the runtime, which
prefers an int8 graph only on a full "quality" record), except the int8-activation ones, which run
the whole reference token by token so that their "quality" record can pass the runtime's gate
(``portable_infer.package.variants.passes_gate``). Every exact graph also passes two
invariants that need no reference: prefill + cached decode equals one pass, and a left-padded row
equals the same tokens alone (at the best ``CONSISTENCY_TOP`` tokens). The bars are ``variants``' (``EXACT_MIN_AGREEMENT``,
``CONSISTENCY_REL_TOL``, ``REFERENCE_REL_TOL``, ``INT8_FLOOR``): an exact variant that misses
more steps than the full check's agreement gate allows (at least one) fails the export; an
int8-activation one below its floor is dropped.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import numpy as np

from portable_infer.package import manifest as mf
from portable_infer.package import variants
from portable_infer.package.verification import Consistency, LogitDiff, Quality, VariantReport
from portable_infer.errors import VerificationError

from . import verify
from .references import load_all

logger = logging.getLogger(__name__)

LAST_STEPS = 32  # greedy steps checked on graphs that return the last position only (token by token)
# the consistency invariants compare the reference's best CONSISTENCY_TOP logits (what a sampler
# reads): a refined head (head.REFINE_TOP, at least 16) computes only its best candidates in float;
# the rest carry int8-activation rounding that a 1e-6 change of the hidden state can flip
CONSISTENCY_TOP = 8


def full_check_available() -> bool:
    """torch and transformers are importable (the ``[export]`` extra)."""
    return all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))


def verify_export(package: Path, manifest: mf.Manifest, src) -> dict:
    """The export's verification: against transformers when it is installed, else :func:`verify_lean`."""
    if full_check_available():
        return verify.verify_package(package, manifest, src)
    return verify_lean(package, manifest, src)


def verify_lean(package: Path, manifest: mf.Manifest, src=None, rng: np.random.Generator | None = None) -> dict:
    """Check every variant without torch; raise VerificationError when a gate fails.

    Returns ``{variant name: VariantReport}`` (as ``verify.verify_package``, with ``reference``
    naming what each graph was compared with)."""
    rng = rng if rng is not None else np.random.default_rng()
    shipped = load_all().get(manifest.source.get("sha256"))
    names = [v.name for v in manifest.variants]
    base = variants.PORTABLE if variants.PORTABLE in names else names[0]
    base_dec = verify.decoder(package / manifest.variant(base).file, manifest.variant(base), manifest)
    if shipped is not None:
        logger.info("verifying against the shipped reference logits %s (no torch needed)", shipped["file"])
        ref = _shipped(shipped)
    else:
        logger.warning("torch/transformers are not installed and the project ships no reference logits "
                       "for this source: its graphs are checked against each other only; "
                       'pip install "portable-infer[export]" for the check against transformers')
        ref = _own(base_dec, base, package, manifest)
    report = {}
    for v in manifest.variants:  # one session at a time (each holds its own copy of the weights)
        dec = base_dec if v.name == base else verify.decoder(package / v.file, v, manifest)
        exact = not variants.is_int8_name(v.name)
        # The whole reference: in one pass where the graph returns every position; token by token
        # for int8-activation graphs too, whose full "quality" record the runtime's gate reads.
        whole = ref["external"] and (v.logits == "all" or not exact)
        seq = ref["seq"] if whole else ref["seq"][:ref["n_prompt"] + LAST_STEPS]
        seq_logits = verify.all_logits(dec, seq[None])[0]
        text_logits = verify.all_logits(dec, ref["text"][None])[0] if whole else None
        q = _quality(seq_logits, seq, text_logits, ref)
        r = VariantReport(
            reference=ref["name"], consistency=consistency(dec, manifest.model.vocab_size, rng) if exact else None,
            quality=q if whole else None, agreement=None if whole else q,
            reference_logits=_top_k_diff(seq_logits, text_logits, ref["top_k"]) if "top_k" in ref else None)
        logger.info("verify (lean) %s: %s", v.name, r)
        report[v.name] = r if not exact else _gate(v.name, r, ref["name"])
        del dec
    for name in [n for n in names if variants.is_int8_name(n)]:  # measured from their exact twins' records
        report[name] = _gate(name, report[name], ref["name"], report.get(variants.exact_twin(name)))
    return report


def consistency(dec, vocab: int, rng: np.random.Generator) -> Consistency:
    """Max relative differences of a graph against itself at the reference's best
    ``CONSISTENCY_TOP`` tokens: prefill + 4 cached steps vs one pass of the whole sequence, and a
    left-padded row (batch of 2) vs the same tokens alone."""
    ids = rng.integers(1, vocab, (2, 12), dtype=np.int64)
    one = dec.run(ids[:1], np.ones((1, 12), np.int64), dec.empty_past(1))[0][0, -1]
    logits, past = dec.run(ids[:1, :8], np.ones((1, 8), np.int64), dec.empty_past(1))
    for t in range(8, 12):
        logits, past = dec.run(ids[:1, t:t + 1], np.ones((1, t + 1), np.int64), past)
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    padded = dec.run(ids, mask, dec.empty_past(2))[0][1, -1]
    alone = dec.run(ids[1:, 3:], np.ones((1, 9), np.int64), dec.empty_past(1))[0][0, -1]
    return Consistency(cached=_best_diff(logits[0, -1], one), padded=_best_diff(padded, alone))


def _best_diff(got: np.ndarray, want: np.ndarray) -> LogitDiff:
    """``got`` against ``want`` at ``want``'s best CONSISTENCY_TOP tokens."""
    return verify.logit_diff(got, want, at=np.argpartition(-want, CONSISTENCY_TOP)[:CONSISTENCY_TOP])


def _shipped(data: dict) -> dict:
    prompt = np.asarray(data["prompt_ids"], np.int64)
    return {"name": f"shipped reference logits ({data['file']})", "external": True, "n_prompt": len(prompt),
            "seq": np.concatenate([prompt, np.asarray(data["greedy_ids"], np.int64)]),
            "text": np.asarray(data["text_ids"], np.int64), "ppl": data["perplexity_reference"],
            "top_k": data["top_k"],
            # the reference's own top-1 after each position from the prompt's last on: what the agreement
            # compares with (its continuation held EOS back, so a continuation token is not always it)
            "top1": np.asarray(data["top_k"]["sequence"]["ids"], np.int64)[len(prompt) - 1:-1, 0],
            "text_top1": np.asarray(data["top_k"]["text"]["ids"], np.int64)[:-1, 0]}


def _own(dec, name: str, package: Path, manifest: mf.Manifest) -> dict:
    """The reference a package gives itself: ``name``'s greedy continuation of the prompt."""
    prompt, text = verify.verification_ids(package, manifest)
    steps = min(LAST_STEPS, manifest.model.max_context - len(prompt))
    seq = np.asarray([prompt], np.int64)
    logits, past = dec.run(seq, np.ones_like(seq), dec.empty_past(1))
    for _ in range(steps):
        seq = np.concatenate([seq, [[int(logits[0, -1].argmax())]]], axis=1)
        logits, past = dec.run(seq[:, -1:], np.ones_like(seq), past)
    return {"name": f"{name} graph (no reference outside the package)", "external": False,
            "n_prompt": len(prompt), "seq": seq[0], "text": np.asarray(text, np.int64), "top1": seq[0, len(prompt):]}


def _nll(logits: np.ndarray, ids: np.ndarray) -> float:
    return float(-np.take_along_axis(verify.log_softmax(logits[:-1]), ids[1:, None], -1).mean())


def _quality(seq_logits: np.ndarray, seq: np.ndarray, text_logits: np.ndarray | None, ref: dict) -> Quality:
    """verify.quality's numbers: teacher-forced top-1 agreement (along the texts too, and
    perplexity on them, where measured)."""
    n = ref["n_prompt"]
    agree = int((seq_logits[n - 1:-1].argmax(-1) == ref["top1"][:len(seq) - n]).sum())
    if text_logits is None:
        return Quality(agreed=agree, steps=len(seq) - n)
    agree += int((text_logits[:-1].argmax(-1) == ref["text_top1"]).sum())
    ppl = float(np.exp(_nll(text_logits, ref["text"])))
    return Quality(agreed=agree, steps=len(seq) - n + len(ref["text_top1"]), perplexity=ppl,
                   perplexity_reference=ref["ppl"])


def _top_k_diff(seq_logits: np.ndarray, text_logits: np.ndarray | None, top_k: dict) -> LogitDiff:
    """Our logits at the reference's top-k ids, at every position we have."""
    worst, scale = 0.0, 0.0
    for ours, part in ((seq_logits, top_k["sequence"]), (text_logits, top_k["text"])):
        if ours is None:
            continue
        ids = np.asarray(part["ids"])[:len(ours)]
        want = np.asarray(part["logits"], np.float32)[:len(ours)]
        got = np.take_along_axis(ours, ids, -1)
        worst = max(worst, float(np.abs(got - want).max()))
        scale = max(scale, float(np.abs(want).max()))
    return LogitDiff(max_abs=worst, max_rel=worst / max(scale, 1e-12))


def _allowed_misses(steps: int) -> int:
    """Steps an exact graph may disagree on: what the full check's agreement gate allows, at least one."""
    return max(1, int((1 - variants.EXACT_MIN_AGREEMENT) * steps))


def _gate(name: str, r: VariantReport, ref_name: str, twin: VariantReport | None = None) -> VariantReport:
    """Raise VerificationError where the exact graph ``name`` fails a bar; ``r``, with an
    int8-activation graph below its floor (measured from its exact twin's report ``twin``) marked
    as dropped."""
    q = r.quality or r.agreement
    if variants.is_int8_name(name):
        return verify.below_floor(name, r, q, twin, f" with the {ref_name}")
    tol = variants.CONSISTENCY_REL_TOL
    bad = {k: d.max_rel for k, d in (("cached", r.consistency.cached), ("padded", r.consistency.padded))
           if d.max_rel > tol}
    if bad:
        raise VerificationError(
            f"{name} graph disagrees with itself ({bad}: cached decode vs one pass, or a left-padded row vs "
            f"the same tokens alone, above {tol:.0e}); the export was not written. Report "
            f"this with the source's config, or pass --no-verify to inspect the graph anyway")
    if q.steps - q.agreed > _allowed_misses(q.steps):
        raise VerificationError(f"{name} graph agrees with the {ref_name} on {q.agree_steps} teacher-forced "
                                f"steps, below the {variants.EXACT_MIN_AGREEMENT:.0%} gate; the export was not written")
    diff = r.reference_logits
    if diff is not None and diff.max_rel > variants.REFERENCE_REL_TOL:
        raise VerificationError(
            f"{name} graph's logits differ from the {ref_name} by {diff.max_rel:.2e} (relative) > "
            f"{variants.REFERENCE_REL_TOL:.0e}; the export was not written")
    return r
