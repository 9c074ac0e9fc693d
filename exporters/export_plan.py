"""What an export will write, decided before anything is written: ``plan_export(src, ...)``.

The options are checked against each other and against the source (its config, its tensors'
shapes: no weights are read) and come back as a frozen ``ExportPlan``; ``export.py`` writes it.
Every refusal is an ``InvalidArgumentError`` naming the option (``param``) and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass

from portable_infer.package import manifest as mf
from portable_infer.engine.dense_companion import dense_bytes
from portable_infer.package.variants import (DEFAULT_VARIANTS, INT8_VARIANTS, PORTABLE, ROTARY_VARIANTS, STATIC_DENSE,
                                             STATIC_VARIANTS, VARIANTS)
from portable_infer.errors import InvalidArgumentError

from .architectures import MODEL_TYPES, family_for
from .architectures.common import check_shapes
from .generation_defaults import generation_defaults
from .lowering.attention import static_fits
from .lowering.spec import variant_spec
from .lowering.variant_spec import VariantSpec
from .quant import BLOCK
from .weights import PRECISION_BITS

PRECISIONS = tuple(PRECISION_BITS)
# The variant names and groups are portable_infer.package.variants' (VARIANTS, DEFAULT_VARIANTS...).
# fused-int8 / static-int8: the fused / static graph with its 4-bit layers at accuracy 4. Left out
# below variants.int8_floor (broken: 10 points under the exact twin's agreement); the runtime
# prefers them only where verification recorded
# them past its quality gate (variants.passes_gate; SmolLM2's GGUF: 743/767, 3.1 points under
# its exact twin: opt-in there); static: fixed KV buffers written in place.
# fused-q4 / static-q4: ONNX Runtime's fastest CPU form (one MatMulNBits per linear, int8
# activations, uint8 zero points, block 32): layers fitted into integer zero points
# (exporters/int4_fit.py: Q4_0 exact at 4 bits, Q4_1 within ~d/32 at 8 bits, float sources at 4
# bits by an error-minimising search), so no correction rows; their own weight copy. Quality
# floors and records as for the -int8 twins.
ROUTES = ("auto", "direct", "fallback")  # fallback: torch.onnx export of the transformers model
# MatMulNBits accuracy levels of the fused graph: 1 keeps activations float, 4 quantizes them to
# int8 per block of 32 (about 2x faster kernels on CPU: benchmarks/graph_step.py --matmulnbits).
# Int4 packages carry both: fused/static at 1 and their "-int8" twins at 4, sharing one copy of
# the weights. The lm_head runs at 4 in both, with its top 16 recomputed in float.
DEFAULT_NBITS_ACCURACY = 1
DEFAULT_HEAD_ACCURACY = 4
# Block sizes (input elements per scale and zero point) of the int4/int8 weights a float source is
# quantized to. 32 is GenAI's builder's default and ours; 64 and 128 (AWQ's and GPTQ's usual group)
# read fewer scale bytes a weight (4.56 and 4.28 bits against 5.13 at int4), which a decode step
# bound by memory bandwidth turns into speed, at a cost in agreement the export measures
# (docs/benchmarks.md "Session 28"). A row whose width the block does not divide takes the largest
# halving that does. Pre-quantized sources (GGUF, AWQ, GPTQ) keep their own blocks.
DEFAULT_BLOCK = BLOCK
BLOCK_SIZES = (BLOCK, 2 * BLOCK, 4 * BLOCK)


@dataclass(frozen=True)
class ExportPlan:
    """Everything ``export()`` writes, as plain data."""

    route: str  # "direct" (our graph builder) or "fallback" (torch.onnx export of the transformers model)
    precision: str  # one of PRECISIONS
    activations: str  # "fp32" or "fp16"
    variants: tuple[str, ...]  # the graph variants to write
    layout: object | None  # the direct route's architectures.DecoderLayout; None for the fallback
    nbits_accuracy: int  # MatMulNBits accuracy level of the fused / static layers
    head_accuracy: int  # and of their lm_head
    max_context: int | None  # cap on the manifest's context (None: the model's)
    generation: mf.GenerationDefaults  # the source's sampling defaults (generation_defaults.py)
    specs: tuple[VariantSpec, ...] = ()  # the direct route's graphs, in the order they are written

    @property
    def shared_variants(self) -> tuple[str, ...]:
        """The fused-family variants, written into one shared weight file (direct route)."""
        return tuple(v for v in self.variants if v not in (PORTABLE, STATIC_DENSE)) if self.route == "direct" else ()


def check_options(precision, max_context, activations, route, block=None, symmetric=False) -> None:
    """The options that need no source: each against its allowed values."""
    if block is not None and block not in BLOCK_SIZES:
        raise InvalidArgumentError(f"block must be one of {BLOCK_SIZES}, got {block!r}", param="block")
    if not isinstance(symmetric, bool):
        raise InvalidArgumentError(f"symmetric must be True or False, got {symmetric!r}", param="symmetric")
    if precision is not None and precision not in PRECISIONS:
        raise InvalidArgumentError(f"precision must be one of {PRECISIONS}, got {precision!r}", param="precision")
    if max_context is not None and (not isinstance(max_context, int) or max_context < 1):
        raise InvalidArgumentError(f"max_context must be a positive integer, got {max_context!r}",
                                   param="max_context")
    if activations not in (None, "fp32", "fp16"):
        raise InvalidArgumentError(f"activations must be 'fp32' or 'fp16', got {activations!r}", param="activations")
    if route not in ROUTES:
        raise InvalidArgumentError(f"route must be one of {ROUTES}, got {route!r}", param="route")


# exported by default where its fp32 weights stay this small (about 2 B parameters; beyond, on request:
# export's verification folds them in memory too): engine/dense_companion.py
DENSE_DEFAULT_MAX_BYTES = 8 << 30


def plan_export(src, *, precision: str | None = None, variants=None, route: str = "auto",
                activations: str | None = None, nbits_accuracy: int | None = None,
                head_accuracy: int | None = None, max_context: int | None = None,
                block: int | None = None, symmetric: bool = False) -> ExportPlan:
    """The plan for exporting the opened source ``src`` (sources.open_source) with these options
    (as ``export()`` takes them). Raises InvalidArgumentError when they do not fit together."""
    check_options(precision, max_context, activations, route, block, symmetric)
    model_type = src.config.get("model_type")
    if route == "auto":
        route = "direct" if model_type in MODEL_TYPES or src.kind == "gguf" else "fallback"
    precision = precision or ("int4" if src.kind == "gguf" else src.default_precision)  # AWQ/GPTQ: int4
    four_bit = precision == "int4" and (activations or "fp32") == "fp32"  # CPU MatMulNBits layers
    defaults = variants is None
    if defaults:  # int8 twins only where they differ from fused/static (static: checked below)
        variants = tuple(v for v in DEFAULT_VARIANTS if four_bit or v not in INT8_VARIANTS)
    variants = tuple(variants)
    if not variants or set(variants) - set(VARIANTS):
        raise InvalidArgumentError(f"variants must be a non-empty subset of {VARIANTS}, got {variants!r}",
                                   param="variants")
    quantized_cpu = precision in ("int4", "int8") and (activations or "fp32") == "fp32"
    if STATIC_DENSE in variants and not quantized_cpu:
        raise InvalidArgumentError(
            f"the {STATIC_DENSE} variant is the exact static graph's fp32 companion for batched CPU forwards: it "
            f"needs int4 or int8 layers at fp32 activations, and this export is {precision} with "
            f"{activations or 'fp32'} activations; leave it out of --variants", param="variants")
    if set(INT8_VARIANTS) & set(variants) and not four_bit:
        raise InvalidArgumentError(
            f"the {'/'.join(INT8_VARIANTS)} variants run 4-bit layers with int8 activations on CPU; this "
            f"export is {precision} with {activations or 'fp32'} activations: use --precision int4 (fp32 "
            f"activations) or leave them out of --variants", param="variants")
    layout = None
    if route == "direct":
        layout = family_for(model_type).layout(src.config)
        check_shapes(layout, src)
        if defaults and not static_fits(layout):
            variants = tuple(v for v in variants if v not in STATIC_VARIANTS)
        if defaults and quantized_cpu and static_fits(layout) and dense_bytes(layout.dims) <= DENSE_DEFAULT_MAX_BYTES:
            variants += (STATIC_DENSE,)  # small models: the CPU server's batched forwards (dense_companion)
        if set(ROTARY_VARIANTS) & set(variants) and not static_fits(layout):
            raise InvalidArgumentError(
                f"the static and paged variants need full rotary attention without sliding windows; "
                f"{model_type} does not qualify: export variants {DEFAULT_VARIANTS} instead", param="variants")
    else:
        variants = tuple(v for v in variants if v == PORTABLE) if defaults else variants
        if src.kind == "gguf":
            raise InvalidArgumentError("the fallback route exports HF folders only, not GGUF files", param="route")
        if PORTABLE not in variants:
            raise InvalidArgumentError(f"the fallback route writes the portable variant only, got {variants!r}",
                                       param="variants")
    if block not in (None, DEFAULT_BLOCK):
        _check_quantized_here(src, precision, route, "block", block, ("int4", "int8"))
    if symmetric:
        _check_quantized_here(src, precision, route, "symmetric", symmetric, ("int4",))
    block = block or DEFAULT_BLOCK
    nbits_accuracy, head_accuracy = nbits_accuracy or DEFAULT_NBITS_ACCURACY, head_accuracy or DEFAULT_HEAD_ACCURACY
    specs = tuple(variant_spec(v, layout, precision=precision, activations=activations or "fp32",
                               nbits_accuracy=nbits_accuracy, head_accuracy=head_accuracy, block=block,
                               symmetric=symmetric)
                  for v in VARIANTS if v in variants and route == "direct")
    return ExportPlan(route=route, precision=precision, activations=activations or "fp32", variants=variants,
                      layout=layout, nbits_accuracy=nbits_accuracy, head_accuracy=head_accuracy,
                      max_context=max_context, generation=generation_defaults(src), specs=specs)


def _check_quantized_here(src, precision: str, route: str, param: str, value, precisions: tuple) -> None:
    """``param`` (``block``, ``symmetric``) shapes the ``precisions`` weights our graph builder
    quantizes from a float source: refused where the export quantizes none of them (another
    precision, the fallback route) or keeps the source's own blocks (GGUF, AWQ, GPTQ)."""
    option, flag = f"{param}={value!r}", f"--{param}"
    if precision not in precisions or route != "direct":
        raise InvalidArgumentError(
            f"{option} applies to the {'/'.join(precisions)} weights our graph builder quantizes; this export is "
            f"{precision} by the {route} route: use --precision {' or '.join(precisions)}, or leave {flag} out",
            param=param)
    if src.kind == "gguf" or src.default_precision != "fp32":
        raise InvalidArgumentError(
            f"{option}: {src.path} is a {'GGUF file' if src.kind == 'gguf' else 'pre-quantized checkpoint'}, "
            f"whose quantized blocks are kept as the source stores them, never re-quantized (a GGUF's float "
            f"tensors follow the file's blocks too); leave {flag} out, or export the float HF folder", param=param)
