"""``pack --ort``: ORT-format graphs in the bundle give the same greedy tokens as the ONNX ones."""

from __future__ import annotations

import zipfile

import pytest

import portable_infer
from portable_infer.package.bundle import pack
from portable_infer.package.ort_format import OPS_CONFIG

pytest.importorskip("onnx")  # ONNX Runtime's converter imports it

PROMPT = [5, 17, 99, 3, 42, 7]


@pytest.fixture(scope="module")
def ort_bundle(tiny_llama, tmp_path_factory):
    """Both variants converted in one converter run (one operator config for both)."""
    return pack(tiny_llama.package, tmp_path_factory.mktemp("ort") / "tiny-ort.pinf", ort=["fused", "portable"])


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("PORTABLE_INFER_HOME", str(tmp_path / "home"))


def test_bundle_holds_ort_graphs_and_the_operator_config(ort_bundle):
    names = zipfile.ZipFile(ort_bundle).namelist()
    assert {"model.ort", "model.fused.ort", OPS_CONFIG} <= set(names)
    model = portable_infer.load(ort_bundle, "cpu", intra_op_threads=1)
    config = (model.path / OPS_CONFIG).read_text()
    assert "com.microsoft;1;" in config and "ai.onnx;" in config and "/tmp" not in config
    for name in ("fused", "portable"):  # same contract as the source graph, CPU only
        src, ort = model.manifest.variant(name), model.manifest.variant(name + "-ort")
        assert (ort.inputs, ort.outputs, ort.kv, ort.logits) == (src.inputs, src.outputs, src.kv, src.logits)
        assert ort.providers == ("cpu",)


def test_cpu_prefers_the_ort_graph_with_the_same_greedy_tokens(tiny_llama, ort_bundle, load_variant):
    onnx = portable_infer.load(tiny_llama.package, "cpu", intra_op_threads=1, static_kv=False)
    model = portable_infer.load(ort_bundle, "cpu", intra_op_threads=1)  # packed for ORT: no static by default
    assert (onnx.variant, model.variant) == ("fused", "fused-ort")
    want = onnx.generate_ids(PROMPT, max_new_tokens=16)
    assert model.generate_ids(PROMPT, max_new_tokens=16) == want
    portable = load_variant(model.path, "portable-ort", threads=1)
    assert portable.generate_ids(PROMPT, max_new_tokens=16) == load_variant(
        tiny_llama.package, "portable", threads=1).generate_ids(PROMPT, max_new_tokens=16)
    low = portable_infer.load(ort_bundle, "cpu", intra_op_threads=1, low_memory=True)  # .ort mapped in place
    assert low.variant == "fused-ort" and low.generate_ids(PROMPT, max_new_tokens=16) == want
