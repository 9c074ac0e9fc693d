"""export_plan.plan_export: the export's decisions as plain data, before anything is written."""

from __future__ import annotations

from dataclasses import replace

import pytest

from exporters.export_plan import ExportPlan, check_options, plan_export
from exporters.lowering.spec import checked
from portable_infer.package.variants import DEFAULT_VARIANTS
from exporters.sources import open_source
from portable_infer.errors import InvalidArgumentError
from portable_infer.package.manifest import GenerationDefaults


def _tree(path):
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*"))


def test_plan_of_an_hf_folder_writes_nothing(tiny_llama):
    before = _tree(tiny_llama.source)
    plan = plan_export(open_source(tiny_llama.source))
    assert isinstance(plan, ExportPlan)
    assert (plan.route, plan.precision, plan.activations) == ("direct", "fp32", "fp32")
    assert plan.variants == ("portable", "fused", "static")  # fp32: no int8 twins; llama: static applies
    assert set(plan.variants) <= set(DEFAULT_VARIANTS) and plan.shared_variants == ("fused", "static")
    assert plan.layout is not None and plan.generation == GenerationDefaults()
    assert _tree(tiny_llama.source) == before


def test_int4_defaults_add_the_int8_twins(tiny_llama):
    plan = plan_export(open_source(tiny_llama.source), precision="int4")
    # and a small model's batched CPU companion (the portable file's blocks: not a shared-file variant)
    assert plan.variants == ("portable", "fused", "fused-int8", "static", "static-int8", "static-dense")
    assert plan.shared_variants == ("fused", "fused-int8", "static", "static-int8")
    assert (plan.nbits_accuracy, plan.head_accuracy) == (1, 4)


@pytest.mark.parametrize("kwargs,param", [
    (dict(variants=("fused-int8",)), "variants"),  # fp32: no 4-bit layers
    (dict(variants=()), "variants"),
    (dict(variants=("fused", "nope")), "variants"),
    (dict(route="fallback", variants=("fused",)), "variants"),
])
def test_refusals_name_the_option(tiny_llama, kwargs, param):
    with pytest.raises(InvalidArgumentError) as info:
        plan_export(open_source(tiny_llama.source), **kwargs)
    assert info.value.param == param


@pytest.mark.parametrize("kwargs,param", [
    (dict(precision="fp8"), "precision"), (dict(max_context=0), "max_context"),
    (dict(activations="bf16"), "activations"), (dict(route="onnx"), "route"),
])
def test_options_without_a_source(kwargs, param):
    args = dict(precision=None, max_context=None, activations=None, route="auto") | kwargs
    with pytest.raises(InvalidArgumentError) as info:
        check_options(**args)
    assert info.value.param == param


def test_each_graph_gets_its_spec(tiny_llama):
    """One frozen spec per variant, in writing order: the form of each op family and of the weights."""
    plan = plan_export(open_source(tiny_llama.source), precision="int4")
    specs = {s.name: s for s in plan.specs}
    assert tuple(specs) == plan.variants
    forms = {name: (s.attention, s.norm, s.rotary, s.projections, s.kv, s.logits, s.head, s.weights.nbits_accuracy)
             for name, s in specs.items()}
    assert forms == {
        "portable": ("masked", "portable", "computed", "separate", "concat", "all", "int8", None),
        "fused": ("gqa", "fused", "cached", "stacked", "concat", "last", "int8-top16", 1),
        "fused-int8": ("gqa", "fused", "cached", "stacked", "concat", "last", "int4-top256", 4),
        "static": ("gqa_static", "fused", "cached", "packed", "static", "row_last", "int8-top16", 1),
        "static-int8": ("gqa_static", "fused", "cached", "packed", "static", "row_last", "int4-top256", 4),
        "static-dense": ("gqa_static", "fused", "cached", "separate", "static", "row_last", "int8", None),
    }
    assert specs["static-dense"].weights.offsets_in_weight and not specs["portable"].weights.offsets_in_weight
    assert not specs["static"].position_ids and specs["static"].next_token and specs["fused"].position_ids
    assert {s.weights.head_accuracy for n, s in specs.items() if n not in ("portable", "static-dense")} == {4}
    assert plan_export(open_source(tiny_llama.source), route="fallback").specs == ()


@pytest.mark.parametrize("change,match", [
    (dict(attention="flash"), "VariantSpec.attention must be one of"),
    (dict(head="int3"), "VariantSpec.head must be one of"),
    (dict(kv="ring"), "VariantSpec.kv must be one of"),
    (dict(kv="concat"), "gqa_static attention and the static KV go together"),
    (dict(kv="paged"), "gqa_static attention and the static KV go together"),
    (dict(kv="paged", attention="paged"), "paged KV and the seq_last logits go together"),
])
def test_a_spec_with_an_unknown_or_mismatched_form_is_refused(tiny_llama, change, match):
    """spec.checked, which every spec the plan holds went through, refuses what no lowering has."""
    static = {s.name: s for s in plan_export(open_source(tiny_llama.source)).specs}["static"]
    assert checked(static) is static
    with pytest.raises(ValueError, match=match):
        checked(replace(static, **change))
