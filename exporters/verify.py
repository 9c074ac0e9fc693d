"""Check an exported graph against the PyTorch model it came from (transformers, same weights).

Checks, on fresh random token ids each run:
  1. full-sequence logits for a batch of 2, one row left-padded (padding positions excluded);
  2. the KV-cache path: prefill, then one token per step, against the same reference logits;
  3. greedy decoding for ``greedy_steps`` tokens, cached ONNX vs the reference;
  4. teacher-forced top-1 agreement over 128 greedy steps and the fixed texts' 639 positions, and
     perplexity on the texts (the quality gate for quantized packages).
The reference runs once per input (``Reference``, ``QualityReference``): every variant of a package
is compared with the same results, one ONNX session at a time. Each variant's results are a
``VariantReport`` (``portable_infer.package.verification``), recorded in the manifest.
The bars are in ``portable_infer.package.variants``: at fp32 a relative difference above
``FP32_REL_TOL`` fails the export; a pre-quantized import (GGUF, AWQ, GPTQ) fails below
``MIN_AGREEMENT`` with its dequantized reference (AWQ/GPTQ: holding the fp16 embedding and lm_head
as the package does, :func:`table_bits`, so the exact graphs match it to fp32 rounding). The
int8-activation graphs (fused-int8, static-int8, and fused-q4, static-q4 with their fitted weights)
are left out of the package (not failing it) below ``variants.int8_floor``, 10 points under their
exact twin's agreement; the runtime prefers them only past its quality gate
(``variants.passes_gate``, also measured from the twin), and runs them on request otherwise.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from portable_infer.package import manifest as mf
from portable_infer.package import variants
from portable_infer.package.verification import GreedyPrefix, LogitDiff, Quality, VariantReport
from portable_infer.errors import SourceError, VerificationError, require

from .references import TEXT_TOKENS, quality_texts
from .sources import quantized_as
from .graph_runs import OnnxDecoder, PagedDecoder, StaticDecoder, decoder  # noqa: F401 - verify.decoder & co.
from .weights import PRECISION_BITS, WeightForm

logger = logging.getLogger(__name__)

AGREEMENT_STEPS = 128
PROMPT_TOKENS = 16  # the greedy continuation's prompt: the texts' first tokens
# No tokenizer: fixed ids stand for the texts (the quality numbers stay comparable between exports)
FIXED_IDS = 64


def load_reference(src, table_bits: int | None = None):
    """The transformers model for a source, in float32 (GGUF: dequantized by transformers).

    ``table_bits``: the width the package holds float embedding / lm_head tables at
    (:func:`table_bits`); an AWQ/GPTQ reference holds them so (``awq_gptq.reference_model``)."""
    torch = require("torch")
    transformers = require("transformers")
    kwargs = {"dtype": torch.float32}
    try:
        if src.kind == "hf" and src.quantization is not None:  # AWQ/GPTQ: float model, dequantized weights
            from .awq_gptq import reference_model

            return reference_model(src, table_bits)
        if src.kind == "gguf":
            require("accelerate")
            model = transformers.AutoModelForCausalLM.from_pretrained(
                str(src.path.parent), gguf_file=src.path.name, **kwargs)
            model = src.align_reference(model)  # what transformers' GGUF loader leaves out (gguf_source.py)
        else:
            model = transformers.AutoModelForCausalLM.from_pretrained(str(src.path), **kwargs)
    except (OSError, ValueError) as exc:
        raise SourceError(f"transformers could not load the reference model from {src.path}: {exc}") from exc
    return model.eval()


def table_bits(manifest: mf.Manifest) -> int | None:
    """The width the package stores a float embedding / lm_head table at (None: as it is), as
    ``weights.WeightForm.table_bits`` decides it for the package's precision and activations."""
    if manifest.precision not in PRECISION_BITS:  # a package this exporter did not write
        return None
    fp16 = any(v.kv.dtype == "float16" for v in manifest.variants)
    return WeightForm(manifest.precision, "fp16" if fp16 else "fp32").table_bits


def all_logits(dec: OnnxDecoder, seq: np.ndarray) -> np.ndarray:
    """Logits [1, len, vocab] at every position: one pass, or token by token through the cache
    for graphs that return the last position only."""
    if dec.v.logits == "all":
        return dec.run(seq, np.ones_like(seq), dec.empty_past(1))[0]
    past, out = dec.empty_past(1), []
    for t in range(seq.shape[1]):
        logits, past = dec.run(seq[:, t:t + 1], np.ones((1, t + 1), np.int64), past)
        out.append(logits[:, -1])
    return np.stack(out, axis=1)


def torch_logits(model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The transformers model's logits [batch, len, vocab] for left-padded ``ids`` and ``mask``."""
    torch = require("torch")
    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(pos), use_cache=False)
    return out.logits.float().numpy()


def logit_diff(a: np.ndarray, ref: np.ndarray, at=None) -> LogitDiff:
    """The largest absolute difference of ``a`` from ``ref`` (at indices ``at`` of the last axis
    only, where given), and that relative to ``ref``'s largest value."""
    abs_diff = float(np.abs(a - ref).max() if at is None else np.abs(a[..., at] - ref[..., at]).max())
    return LogitDiff(max_abs=abs_diff, max_rel=abs_diff / max(float(np.abs(ref).max()), 1e-12))


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@dataclass(frozen=True)
class Reference:
    """What the transformers reference gives for the random inputs of checks 1-3, computed once
    and compared with every variant (:func:`reference`)."""

    ids: np.ndarray  # [2, length] random ids; row 1 left-padded by ``mask``
    mask: np.ndarray
    logits: np.ndarray  # the reference's logits for ``ids`` at every position
    prompt: np.ndarray  # [1, 8] random ids: the greedy check's prompt
    greedy: np.ndarray  # [greedy_steps] the reference's greedy continuation (full recompute)


@dataclass(frozen=True)
class QualityReference:
    """What the reference gives for check 4 (:func:`quality_reference`), computed once."""

    seq: np.ndarray  # [1, prompt + steps] the prompt and the reference's greedy continuation
    prompt_len: int
    steps: int
    # [steps] the reference's own top-1 at each continuation position, teacher-forced on ``seq``:
    # what the agreement compares with (generate() holds EOS back for all the steps, so a
    # continuation token is not always the reference's top-1)
    top1: np.ndarray
    text: np.ndarray  # [1, n] the fixed texts' ids, one after another
    perplexity: float  # the reference's perplexity on ``text``
    text_top1: np.ndarray  # [n - 1] the reference's top-1 after each position of ``text`` but its last


def reference(model, vocab: int, rng: np.random.Generator, greedy_steps: int = 16) -> Reference:
    """Draw the random inputs of checks 1-3 and run the reference on them once."""
    length = 12
    ids = rng.integers(0, vocab, (2, length), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[1, :3] = 0  # row 1 is left-padded
    logits = torch_logits(model, ids, mask)
    prompt = rng.integers(0, vocab, (1, 8), dtype=np.int64)
    seq = prompt.copy()
    for _ in range(greedy_steps):  # recomputing the full sequence: the reference keeps no cache
        nxt = torch_logits(model, seq, np.ones_like(seq))[0, -1].argmax()
        seq = np.concatenate([seq, [[nxt]]], axis=1)
    return Reference(ids, mask, logits, prompt, seq[0, prompt.shape[1]:])


def compare(model, dec: OnnxDecoder, vocab: int, rng: np.random.Generator, greedy_steps: int = 16,
            ref: Reference | None = None) -> VariantReport:
    """Checks 1-3 on random ids; returns the report (differences and greedy agreement).

    ``ref``: the reference's results (:func:`reference`), shared by the variants of one package;
    None draws the ids from ``rng`` and runs ``model`` on them here."""
    ref = ref if ref is not None else reference(model, vocab, rng, greedy_steps)
    ids, mask, length = ref.ids, ref.mask, ref.ids.shape[1]
    full, _ = dec.run(ids, mask, dec.empty_past(2))
    if dec.v.logits == "all":
        real = mask.astype(bool)
        full_diff = logit_diff(full[real], ref.logits[real])
    else:  # last position only
        full_diff = logit_diff(full[:, -1], ref.logits[:, -1])

    # prefill all but 4 tokens, then decode them one by one through the cache
    split = length - 4
    logits, past = dec.run(ids[:, :split], mask[:, :split], dec.empty_past(2))
    steps = [logits[:, -1]]
    for t in range(split, length):
        logits, past = dec.run(ids[:, t:t + 1], mask[:, :t + 1], past)
        steps.append(logits[:, -1])
    cached = np.stack(steps[:-1], axis=1)
    cached_diff = logit_diff(cached, ref.logits[:, split - 1:length - 1])

    # greedy: ONNX through the cache vs the reference recomputing the full sequence
    seq_onnx = ref.prompt.copy()
    logits, past = dec.run(ref.prompt, np.ones_like(ref.prompt), dec.empty_past(1))
    for _ in range(len(ref.greedy)):
        tok = logits[0, -1].argmax()
        seq_onnx = np.concatenate([seq_onnx, [[tok]]], axis=1)
        logits, past = dec.run(np.array([[tok]]), np.ones_like(seq_onnx), past)
    same = ref.greedy == seq_onnx[0, ref.prompt.shape[1]:]
    n = len(ref.greedy)
    greedy = GreedyPrefix(steps=n, identical_prefix=int(np.argmin(same)) if not same.all() else n)
    return VariantReport(full=full_diff, cached=cached_diff, greedy=greedy)


def quality_reference(model, prompt_ids: list, text_ids: list, max_context: int) -> QualityReference:
    """The reference's greedy continuation of the prompt (128 steps), its top-1 along it and
    along the text, and perplexity on the text."""
    torch = require("torch")
    steps = min(AGREEMENT_STEPS, max_context - len(prompt_ids))
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=steps, do_sample=False,
                             min_new_tokens=steps, pad_token_id=0)
    seq = out[0].numpy()[None].astype(np.int64)
    top1 = torch_logits(model, seq, np.ones_like(seq))[0, len(prompt_ids) - 1:-1].argmax(-1)
    text = np.asarray([text_ids[:max_context]], dtype=np.int64)
    text_logits = torch_logits(model, text, np.ones_like(text))
    ppl = float(np.exp(_nll(text_logits, text)))
    return QualityReference(seq, len(prompt_ids), steps, top1, text, ppl, text_logits[0, :-1].argmax(-1))


def _nll(logits: np.ndarray, text: np.ndarray) -> float:
    return float(-np.take_along_axis(log_softmax(logits[0, :-1]), text[0, 1:, None], -1).mean())


def quality(model, dec: OnnxDecoder, prompt_ids: list, text_ids: list, max_context: int,
            ref: QualityReference | None = None) -> Quality:
    """Teacher-forced top-1 agreement with the reference's top-1 on the same tokens, over the 128
    steps of its greedy continuation and every position of the fixed texts (639 with a tokenizer:
    a 2-point bar is then 15 positions, not 2.5), and perplexity on the texts.

    ``ref``: the reference's results (:func:`quality_reference`), shared by the variants of one
    package; None runs ``model`` here."""
    ref = ref if ref is not None else quality_reference(model, prompt_ids, text_ids, max_context)
    n, steps = ref.prompt_len, ref.steps
    ours = all_logits(dec, ref.seq)
    agree = int((ours[0, n - 1:-1].argmax(-1) == ref.top1).sum())
    text = all_logits(dec, ref.text)
    agree += int((text[0, :-1].argmax(-1) == ref.text_top1).sum())
    ppl = float(np.exp(_nll(text, ref.text)))
    return Quality(agreed=agree, steps=steps + len(ref.text_top1), perplexity=ppl, perplexity_reference=ref.perplexity)


def verification_ids(package: Path, manifest: mf.Manifest) -> tuple[list, list]:
    """``(prompt ids, text ids)`` the quality check runs: the fixed texts
    (:func:`exporters.references.quality_texts`) as the package's tokenizer encodes them, each
    cut to its first ``TEXT_TOKENS``, one after another (the first ``PROMPT_TOKENS`` the prompt),
    or fixed random ids without a tokenizer."""
    if manifest.tokenizer.file:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(package / manifest.tokenizer.file))
        text = [i for path in quality_texts()
                for i in tok.encode(path.read_text(encoding="utf-8"), add_special_tokens=False).ids[:TEXT_TOKENS]]
        return text[:PROMPT_TOKENS], text
    # No tokenizer: fixed id sequences stand for the prompt and the text, so the quality numbers
    # recorded in the manifest are comparable between exports (the parity checks stay random).
    fixed = np.random.default_rng(1234)
    vocab = manifest.model.vocab_size
    return fixed.integers(0, vocab, PROMPT_TOKENS).tolist(), fixed.integers(0, vocab, FIXED_IDS).tolist()


def verify_package(package: Path, manifest: mf.Manifest, src, model=None, only=(),
                   rng: np.random.Generator | None = None) -> dict:
    """Run every check on every variant; raise VerificationError when a gate fails.

    Returns ``{variant name: VariantReport}``. The reference runs first and once per input: the
    random ids are drawn once (from ``rng``, default a fresh generator) and every variant is
    compared with the same reference results. The reference model is then let go (when loaded
    here), and the ONNX sessions run one at a time: the process never holds the reference's
    weights and a session's, nor two sessions, at once."""
    checked = [v for v in manifest.variants if not only or v.name in only]
    if not checked:
        return {}
    rng = rng if rng is not None else np.random.default_rng()
    model = model if model is not None else load_reference(src, table_bits(manifest))
    ref = reference(model, manifest.model.vocab_size, rng)
    quality_ref = None
    if any(_checks_quality(v, src) for v in checked):
        quality_ref = quality_reference(model, *verification_ids(package, manifest), manifest.model.max_context)
    del model
    gc.collect()
    report = {}
    for v in checked:
        dec = decoder(package / v.file, v, manifest)
        try:
            r = compare(None, dec, manifest.model.vocab_size, rng, ref=ref)
            if _checks_quality(v, src):
                r = dataclasses.replace(r, quality=quality(None, dec, [], [], manifest.model.max_context,
                                                           ref=quality_ref))
        finally:
            del dec  # free this session before the next one starts
            gc.collect()
        logger.info("verify %s: %s", v.name, r)
        report[v.name] = r if variants.is_int8_name(v.name) else _gate(v, r, src)
    for v in checked:  # int8 graphs: measured from their exact twins' records (this run's, else the manifest's)
        if variants.is_int8_name(v.name):
            twin = variants.exact_twin(v.name)
            report[v.name] = _gate(v, report[v.name], src, report.get(twin) or manifest.verification.get(twin))
    return report


def _checks_quality(v: mf.GraphVariant, src) -> bool:
    """Check 4 runs on quantized graphs and on every GGUF import."""
    return v.precision != "fp32" or src.kind == "gguf"


def _gate(v: mf.GraphVariant, r: VariantReport, src, twin: VariantReport | None = None) -> VariantReport:
    """Raise VerificationError where ``v`` fails its gate; ``r``, with an int8-activation variant
    below its floor (measured from its exact twin's report ``twin``) marked as dropped (``dropped``
    says why)."""
    worst = max(r.full.max_rel, r.cached.max_rel)
    if v.precision == "fp32" and worst > variants.FP32_REL_TOL:
        raise VerificationError(
            f"{v.name} graph differs from the transformers reference: max relative difference "
            f"{worst:.2e} > {variants.FP32_REL_TOL:.0e} (full {r.full}, cached {r.cached}); the export "
            f"was not written. Report this with the source's config.json, or pass --no-verify to "
            f"inspect the graph anyway")
    q = r.quality
    if variants.is_int8_name(v.name) and q is not None:
        logger.info("verify %s (int8 activations): top-1 agreement %s, perplexity %+.2f %%", v.name,
                    q.agree_steps, 100 * q.perplexity_delta)
        return below_floor(v.name, r, q, twin, "")
    floor = variants.MIN_AGREEMENT.get(quantized_as(src))
    if floor and q is not None and q.top1_agreement < floor:
        raise VerificationError(
            f"{v.name} graph agrees with the reference on {q.agree_steps} "
            f"teacher-forced steps, below the {floor:.0%} gate; the export was not written")
    return r


def below_floor(name: str, r: VariantReport, q, twin: VariantReport | None, against: str) -> VariantReport:
    """``r``, marked as dropped where the int8-activation variant ``name`` agrees below its floor
    (``variants.int8_floor``: 10 points under its exact twin's agreement, or 90 % of the reference)."""
    floor = variants.int8_floor(name, twin)
    if variants.clears(q.top1_agreement, floor):
        return r
    base = "" if twin is None or twin.quality is None else (
        f" ({variants.exact_twin(name)} agrees on {twin.quality.agree_steps})")
    return dataclasses.replace(r, dropped=f"top-1 agreement {q.agree_steps}{against} is below the {floor:.0%} "
                                          f"floor for int8 activations{base}")


def verify_existing(package, reference=None) -> dict:
    """``portable-infer verify``: the same checks on an existing package, against ``reference``
    (an HF folder or GGUF file; default: the source recorded in the manifest); ``{variant name:
    VariantReport}``."""
    from .sources import open_source

    package = Path(package)
    manifest = mf.Manifest.load(package)
    src = open_source(reference or manifest.source.get("path"))
    return verify_package(package, manifest, src)
