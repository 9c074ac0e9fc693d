"""One frozen spec per graph variant: which form of each op family the decoder builder asks for.

``variant_spec`` makes a variant's ``VariantSpec`` (plain data, in ``variant_spec.py``) and
``checked`` holds each of its forms against the op family module that has them: an unknown form
is a ValueError where the spec is made. The builder (``exporters/decoder.py``) walks the layout;
each op family's module holds its forms side by side and picks one by the spec::

                  portable           fused                         static
    attention     masked             gqa  (masked: partial rotary)  gqa_static
    norm          portable           fused                         fused
    rotary        computed           cached (computed: partial)    cached (inside GroupQueryAttention)
    projections   separate           stacked                       packed
    kv            concat             concat                        static  (no position_ids input)
    logits        all                last                          row_last (+ next_token output)

The paged variant is the static column over a pool of KV blocks: attention ``paged``
(``paged_reference`` in tests), kv ``paged``, logits ``seq_last`` (lowering/paged.py).
    head          int8 | fp32        int4-top256 | int8-top16 | int8 | int4 | fp32 (head.HEAD_FORMS)
    weights       DequantizeLinear   MatMulNBits                   MatMulNBits

``static-dense`` is the static column with the portable weights (DequantizeLinear, separate
projections: the portable graph's data file holds them once), for the CPU engine's batched steps.

The -int8 twins run the fused / static spec with int8 activations in their layers
(``weights.nbits_accuracy`` 4); the -q4 ones also fit their layers to MatMulNBits' integer form.
"""

from __future__ import annotations

from portable_infer.package.variants import (FUSED, FUSED_INT8, FUSED_Q4, PAGED, PORTABLE, STATIC, STATIC_DENSE,
                                             STATIC_INT8, STATIC_Q4)

from ..quant import BLOCK
from ..weights import WeightForm
from . import attention, head, linear, norm, rotary
from .variant_spec import VariantSpec

INT8_ACCURACY = 4  # the -int8 / -q4 graphs' layers: int8 activations
# the lm_head forms (head.HEAD_FORMS) of the -q4 graphs, of the -int8 ones and of the exact ones;
# measured in docs/benchmarks.md
Q4_HEAD = "int4-top256"
INT8_HEAD = "int4-top256"
EXACT_HEAD = "int8-top16"
# name -> (file, form, layers at int8 activations, layers fitted to MatMulNBits' integer form)
VARIANT_FORMS = {
    PORTABLE: ("model.onnx", "portable", False, False),
    FUSED: ("model.fused.onnx", "fused", False, False),
    FUSED_INT8: ("model.fused-int8.onnx", "fused", True, False),
    STATIC: ("model.static.onnx", "static", False, False),
    STATIC_INT8: ("model.static-int8.onnx", "static", True, False),
    FUSED_Q4: ("model.fused-q4.onnx", "fused", True, True),
    STATIC_Q4: ("model.static-q4.onnx", "static", True, True),
    PAGED: ("model.paged.onnx", "paged", False, False),
    STATIC_DENSE: ("model.static-dense.onnx", "static-dense", False, False),
}
KV_FORMS = ("concat", "static", "paged")
# the paged variant's attention: PagedAttention (CUDA); tests build "paged_reference" (standard ops)
PAGED_ATTENTION = "paged"


# field -> the forms it may take, from the modules that hold them
ALLOWED = (("attention", attention.FORMS), ("norm", norm.FORMS), ("rotary", rotary.FORMS),
           ("projections", linear.PROJECTIONS), ("kv", KV_FORMS), ("logits", head.POSITION_DIM),
           ("head", head.HEAD_FORMS))


def checked(spec: VariantSpec) -> VariantSpec:
    """``spec`` when each of its forms exists and they fit together, else ValueError."""
    for field, allowed in ALLOWED:
        if getattr(spec, field) not in allowed:
            raise ValueError(f"VariantSpec.{field} must be one of {tuple(allowed)}, got {getattr(spec, field)!r}")
    if (spec.attention == "gqa_static") != (spec.kv == "static"):
        raise ValueError("the gqa_static attention and the static KV go together")
    if spec.attention.startswith("paged") != (spec.kv == "paged") or (spec.kv == "paged") != (spec.logits == "seq_last"):
        raise ValueError("the paged attention forms, the paged KV and the seq_last logits go together")
    return spec


def variant_spec(name: str, layout, *, precision: str, activations: str = "fp32", nbits_accuracy: int = 1,
                 head_accuracy: int = 4, block: int = BLOCK, symmetric: bool = False) -> VariantSpec:
    """The spec of variant ``name`` for ``layout`` (architectures.DecoderLayout) at these export options
    (``nbits_accuracy``: the layers' MatMulNBits accuracy level where the variant does not fix it;
    ``block``, ``symmetric``: the blocks of the float weights quantized here, int4 without zero points)."""
    file, form, int8, fitted = VARIANT_FORMS[name]
    if form in ("portable", "static-dense"):  # DequantizeLinear weights (the portable graph's records)
        weights = WeightForm(precision, activations, block=block, symmetric=symmetric,
                             offsets_in_weight=form == "static-dense")
        if form == "static-dense":  # the static graph's I/O, separate projections (the portable data file's)
            return checked(VariantSpec(name, file, ("cpu",), "gqa_static", "fused", "cached", "separate", "static",
                                       "row_last", _head(weights, "int8"), weights, position_ids=False,
                                       next_token=True))
        return checked(VariantSpec(name, file, ("*",), "masked", "portable", "computed", "separate", "concat",
                                   "all", _head(weights, "int8"), weights))
    weights = WeightForm(precision, activations, nbits_accuracy=INT8_ACCURACY if int8 else nbits_accuracy,
                         head_accuracy=head_accuracy, int4_fit=fitted, block=block, symmetric=symmetric)
    lm_head = _head(weights, Q4_HEAD if fitted else INT8_HEAD if int8 else EXACT_HEAD)
    if form == "paged":
        providers = ("cuda",) if PAGED_ATTENTION == "paged" else ("*",)  # the reference runs anywhere
        return checked(VariantSpec(name, file, providers, PAGED_ATTENTION, "fused", "cached", "packed", "paged",
                                   "seq_last", lm_head, weights, position_ids=False, next_token=True))
    if form == "static":
        return checked(VariantSpec(name, file, ("cpu", "cuda"), "gqa_static", "fused", "cached", "packed", "static",
                                   "row_last", lm_head, weights, position_ids=False, next_token=True))
    cached = rotary.cache_fits(layout)  # else the portable rotary and attention (partial rotary)
    attn = "gqa" if cached or layout.positions != "rope" else "masked"
    return checked(VariantSpec(name, file, ("cpu", "cuda"), attn, "fused", "cached" if cached else "computed",
                               "stacked", "concat", "last", lm_head, weights))


def _head(weights: WeightForm, form: str) -> str:
    """The lm_head form a graph runs: a float table stays a float MatMul; refining the top
    candidates of the 8-bit table changes nothing when it runs float activations (accuracy 1)."""
    if weights.table_bits is None:
        return "fp32"
    return "int8" if form == "int8-top16" and weights.table_accuracy == 1 else form
