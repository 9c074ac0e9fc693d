"""Graph variant names and every quality bar they are held to: one home for both sides.

The exporter writes variants under these names and applies these gates when it verifies them
(``exporters/export_plan.py``, ``verify.py``, ``lean_verify.py`` import them: the exporter may
import the runtime's contract); the runtime chooses among them by the same names and the same
gate (``variant_choice.py``, ``engine/providers.py``). No module states a name or a bar again.

    portable                standard ONNX ops, any provider
    fused                   com.microsoft kernels of the CPU and CUDA providers
    static                  the fused ops with fixed KV buffers written in place (CUDA graphs)
    <fused|static>-int8     the exact twin with int8 activations in its 4-bit layers (int4 packages)
    <fused|static>-q4       int8 activations on weights fitted to MatMulNBits' integer form
    paged                   the static graph's ops over a pool of KV blocks, a step's tokens packed
                            (CUDA's PagedAttention; serving, on request)
    <name>-ort              the same graph in ONNX Runtime's format (``pack --ort``)

Two kinds of bar: the export's, which fail an export or leave a graph out of the package, and
the runtime's quality gate, under which an int8-activation graph runs only when asked for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from portable_infer.package.manifest import GraphVariant
    from portable_infer.package.verification import VariantReport

# --- names ----------------------------------------------------------------------------------------
PORTABLE = "portable"
FUSED = "fused"
STATIC = "static"
PAGED = "paged"
INT8_SUFFIX = "-int8"  # fused-int8, static-int8: their exact twins with int8 activations
Q4_SUFFIX = "-q4"  # fused-q4, static-q4: int8 activations on weights fitted to MatMulNBits' integer form
ORT_SUFFIX = "-ort"  # pack --ort: a variant's graph converted to ORT format
FUSED_INT8, STATIC_INT8 = FUSED + INT8_SUFFIX, STATIC + INT8_SUFFIX
FUSED_Q4, STATIC_Q4 = FUSED + Q4_SUFFIX, STATIC + Q4_SUFFIX
# the exact static graph's batched companion on the CPU: its 4-bit layers in DequantizeLinear form,
# which ONNX Runtime folds into fp32 MatMuls at load (loader.batched_companion); never run alone
STATIC_DENSE = STATIC + "-dense"

VARIANTS = (PORTABLE, FUSED, FUSED_INT8, STATIC, STATIC_INT8, FUSED_Q4, STATIC_Q4, PAGED, STATIC_DENSE)  # what export writes
Q4_VARIANTS = (FUSED_Q4, STATIC_Q4)
INT8_VARIANTS = (FUSED_INT8, STATIC_INT8, *Q4_VARIANTS)  # only where layers are 4-bit, float activations
STATIC_VARIANTS = (STATIC, STATIC_INT8, STATIC_Q4, STATIC_DENSE)  # only for rotary models without sliding windows
ROTARY_VARIANTS = (*STATIC_VARIANTS, PAGED)  # only for rotary models without sliding windows
DEFAULT_VARIANTS = tuple(v for v in VARIANTS if v not in (*Q4_VARIANTS, PAGED, STATIC_DENSE))  # on request (--variants)
EXACT_TWINS = (FUSED, FUSED + ORT_SUFFIX, PORTABLE + ORT_SUFFIX, STATIC)  # what an int8 variant replaces


def is_int8_name(name: str) -> bool:
    """An int8-activation variant's name: fused-int8, static-int8, fused-q4, static-q4 (or their ``-ort`` copies)."""
    return name.removesuffix(ORT_SUFFIX).endswith((INT8_SUFFIX, Q4_SUFFIX))


def is_int8(v: GraphVariant) -> bool:
    return is_int8_name(v.name)


def is_static(v: GraphVariant) -> bool:
    return v.kv.growth == "static"


def is_paged(v: GraphVariant) -> bool:
    return v.kv.growth == "paged"


# --- the export's bars (exporters/verify.py, exporters/lean_verify.py) -----------------------------
# fp32 graphs against the transformers reference: the largest logit difference relative to the
# reference's largest |logit|, full sequence and through the KV cache; above it the export fails.
FP32_REL_TOL = 1e-4
# Exact graphs of pre-quantized sources (exact blocks) against their dequantized reference, and
# every exact graph in the lean check: teacher-forced top-1 agreement below this fails the export.
EXACT_MIN_AGREEMENT = 0.98
MIN_AGREEMENT = {"gguf": EXACT_MIN_AGREEMENT, "awq": EXACT_MIN_AGREEMENT, "gptq": EXACT_MIN_AGREEMENT}  # by source
# int8-activation graphs trade exactness for speed: more than 1 - INT8_FLOOR (10 points) of top-1
# agreement below their exact twin's they are broken, not merely approximate, and are left out of
# the package (their exact twins stay). Against the reference itself where the twin has no record.
INT8_FLOOR = {name: 0.90 for name in INT8_VARIANTS}
# The lean check (no torch): an exact graph against itself (cached decode vs one pass, a
# left-padded row vs the same tokens alone) at the best lean_verify.CONSISTENCY_TOP tokens, and its
# logits at the shipped reference's top-k ids (the fused graphs' lm_head runs int8 activations, top
# 16 recomputed in float). SmolLM2, 200 draws: consistency at most 3.2e-6 fused; over all logits
# it reached 3.0e-3 (int8 rounding of the unrefined ones), which is why only the best are compared.
CONSISTENCY_REL_TOL = 1e-3
REFERENCE_REL_TOL = 5e-3

# --- the runtime's quality gate ---------------------------------------------------------------------
# An int8-activation graph competes by default (prefer="speed") only when export verification
# recorded that int8 activations cost little against the float reference, measured from where its
# exact twin (the same weights at float activations: fused for fused-int8 and fused-q4, static
# for static-int8 and static-q4) stands: teacher-forced top-1 agreement over the gate's positions
# (verify.quality's 128 greedy steps and 639 of fixed texts: 2 points are 15 positions, where 128
# positions alone made them 2.5) at most 1 - GATE_AGREEMENT (2 points) below the twin's, and a
# perplexity at most GATE_PPL_INCREASE above the twin's (or the reference's, where that is higher).
# What the weights' own rounding costs is the precision the user chose, not the activations': a
# float checkpoint's exact int4 graph agrees on 100/128 with its float reference, and its int8 twin on
# 99/128 at a lower perplexity (SmolLM2's float stand-in, docs/benchmarks.md "Session 24"), where a
# bar on the reference alone kept the exact graph. A GGUF source's exact graphs are its reference
# (128/128), so there the bar is 98 % of the reference: at 95 % (llama.cpp's Q4_1 class, 612/636 on
# compare_cpu.py's texts) SmolLM2's static-int8 (123/128) ran by default and answered README's
# first-run question wrongly where the exact graph answers it (tests/test_lean_first_run.py), so the
# default keeps a graph that close to exact; prefer="speed" with accuracy_level=4 asks for more.
GATE_AGREEMENT = 0.98
GATE_PPL_INCREASE = 0.01


def exact_twin(name: str) -> str:
    """The exact variant an int8-activation one stands in for: fused-int8 and fused-q4 -> fused,
    static-int8 and static-q4 -> static (an ``-ort`` copy's too)."""
    return name.removesuffix(ORT_SUFFIX).removesuffix(INT8_SUFFIX).removesuffix(Q4_SUFFIX)


# A record exactly at a bar clears it: agreement is agreed / steps, which is no binary fraction
# (767 or 191 positions), and a bar measured from the twin subtracts its shortfall again, so the
# comparison allows float rounding's size.
AT_BAR = 1e-9


def clears(agreement: float, bar: float) -> bool:
    """``agreement`` is at or above ``bar`` (a gate's or a floor's), float rounding aside."""
    return agreement >= bar - AT_BAR


def _full(report: VariantReport | None):
    q = report.quality if report is not None else None
    return q if q is not None and q.perplexity_delta is not None else None


def twin_agreement(twin: VariantReport | None) -> float:
    """The top-1 agreement an int8 variant's bars are measured from: its exact twin's recorded
    one (1.0, the reference's own, without a record)."""
    q = twin.quality if twin is not None else None
    return q.top1_agreement if q is not None else 1.0


def int8_floor(name: str, twin: VariantReport | None) -> float:
    """The top-1 agreement below which the int8-activation variant ``name`` is left out of the
    package: INT8_FLOOR's 10 points below its exact twin's (``twin``, that variant's report)."""
    return INT8_FLOOR[name] - (1.0 - twin_agreement(twin))


def passes_gate(report: VariantReport | None, twin: VariantReport | None = None) -> bool:
    """Export verification's record of one int8-activation variant (``manifest.verification[name]``)
    clears the quality gate, measured from its exact twin's record ``twin``
    (``manifest.verification[exact_twin(name)]``; None: from the reference): a full ``quality``
    record with agreement and perplexity, both within the bar."""
    q = _full(report)
    if q is None:
        return False  # no full record (e.g. the lean check's short "agreement"): never preferred by default
    base = _full(twin)
    ppl = max(base.perplexity, q.perplexity_reference) if base is not None else q.perplexity_reference
    return (clears(q.top1_agreement, GATE_AGREEMENT - (1.0 - twin_agreement(twin)))
            and q.perplexity <= ppl * (1.0 + GATE_PPL_INCREASE))


def recorded_past_gate(verification, name: str) -> bool:
    """Whether the manifest's ``verification`` records the int8-activation variant ``name`` (or its
    ``-ort`` copy) past the quality gate, measured from its exact twin's record."""
    return passes_gate(verification.get(name.removesuffix(ORT_SUFFIX)), verification.get(exact_twin(name)))


def gate_text() -> str:
    return (f"top-1 agreement at most {100 * (1 - GATE_AGREEMENT):.0f} points below its exact twin's and "
            f"perplexity within {GATE_PPL_INCREASE:.0%} of the twin's")
