"""benchmarks/graph_patch.py's patches that claim to keep the graph's results (timing tools whose
figures docs/benchmarks.md reports): run on a tiny int4 export, against the unpatched graph."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import graph_patch  # noqa: E402

SEED = 20261205


@pytest.fixture(scope="module")
def int4_package(tiny_llama, tmp_path_factory):
    from exporters.export import export

    root = tmp_path_factory.mktemp("patch")
    return export(tiny_llama.source, root / "pkg", precision="int4", variants=("static", "static-int8"), verify=False)


def _engine(folder: Path, name: str):
    import onnxruntime as ort

    from portable_infer.engine.providers import select_session
    from portable_infer.engine.session import SessionConfig, make_engine
    from portable_infer.package import manifest as mf

    manifest = mf.Manifest.load(folder)
    sel = select_session([manifest.variant(name)], folder, "cpu",
                         session_options=SessionConfig(intra_op_threads=1).session_options(ort))
    return make_engine(sel, manifest, ort)


def _decode(engine, prompt: np.ndarray, steps: int, greedy: bool) -> list:
    """Each step's output (logits, or the graph's next_token with ``greedy``), fed the original's tokens."""
    cache = engine.new_cache(1, capacity=prompt.shape[1] + steps + 1)
    out = [engine.forward(prompt, np.ones_like(prompt), cache, greedy=greedy)]
    for t in range(steps):
        nxt = np.array([[int(np.argmax(out[-1][0])) if not greedy else int(out[-1][0])]], np.int64)
        out.append(engine.forward(nxt, np.ones((1, prompt.shape[1] + t + 1), np.int64), cache, greedy=greedy))
    return out


def test_block16_keeps_the_weights(int4_package, tmp_path):
    """block16: the same codes and scales at block 16; with float activations (the exact static
    graph) the logits are the unpatched graph's."""
    rng = np.random.default_rng(SEED)
    prompt = rng.integers(0, 256, (1, 9)).astype(np.int64)
    print("seed", SEED, "prompt", prompt.tolist())
    out = graph_patch.patch_package(int4_package, "static", tmp_path / "b16", ["block16"])
    import onnx

    sizes = {graph_patch._attr(n, "block_size") for n in graph_patch._layers(onnx.load(str(out), load_external_data=False))}
    assert sizes == {16}
    want = _decode(_engine(int4_package, "static"), prompt, 6, greedy=False)
    got = _decode(_engine(tmp_path / "b16", "static"), prompt, 6, greedy=False)
    for w, g in zip(want, got):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


def test_head_lean_picks_the_same_token(int4_package, tmp_path):
    """head-lean: next_token from the refined candidates equals the unpatched graph's argmax over
    every logit, step after step; the logits output is unchanged."""
    rng = np.random.default_rng(SEED + 1)
    prompt = rng.integers(0, 256, (1, 7)).astype(np.int64)
    print("seed", SEED + 1, "prompt", prompt.tolist())
    out = graph_patch.patch_package(int4_package, "static-int8", tmp_path / "lean", ["head-lean"])
    import onnx

    g = onnx.load(str(out), load_external_data=False).graph
    scatter = next(n for n in g.node if n.op_type == "ScatterElements")
    assert [n.input[0] for n in g.node if n.op_type == "ArgMax"] == [scatter.input[2]]  # the refined rows only
    assert graph_patch._attr(next(n for n in g.node if n.op_type == "TopK"), "sorted") == 0
    base, lean = _engine(int4_package, "static-int8"), _engine(tmp_path / "lean", "static-int8")
    want = _decode(base, prompt, 12, greedy=True)
    got = _decode(lean, prompt, 12, greedy=True)
    assert [int(t[0]) for t in got] == [int(t[0]) for t in want]
    np.testing.assert_array_equal(_decode(lean, prompt, 3, greedy=False)[-1], _decode(base, prompt, 3, greedy=False)[-1])


def test_layers_at_block_64_round_the_same_weights(int4_package, tmp_path):
    """layers4-b64: every decoder-layer MatMulNBits at block 64 (read back at its own block), each
    weight within half a step of the block-32 original, and the graph runs on them."""
    import onnx

    rng = np.random.default_rng(SEED + 1)
    prompt = rng.integers(0, 256, (1, 9)).astype(np.int64)
    print("seed", SEED + 1, "prompt", prompt.tolist())
    original = onnx.load(str(int4_package / "model.static.onnx"))
    out = graph_patch.patch_package(int4_package, "static", tmp_path / "b64", ["layers4-b64"])
    patched = onnx.load(str(out))
    before, after = graph_patch._layers(original), graph_patch._layers(patched)
    assert {graph_patch._attr(n, "block_size") for n in after} == {64} and len(before) == len(after)
    for old, new in zip(before, after):
        w0, w1 = graph_patch.dequantize(original, old), graph_patch.dequantize(patched, new)
        step = graph_patch._init(patched, new.input[2]).reshape(w1.shape[0], -1)
        assert np.all(np.abs(w1 - w0) <= np.repeat(step, 64, axis=1)[:, :w0.shape[1]] / 2 + 1e-6), new.name
    ref, got = _decode(_engine(int4_package, "static"), prompt, 3, False), _decode(_engine(tmp_path / "b64", "static"), prompt, 3, False)
    assert all(np.isfinite(g).all() and g.shape == r.shape for g, r in zip(got, ref))


def test_no_offsets_drops_each_q4_1_offset_term(tmp_path):
    """no-offsets (timing only): a Q4_1 package's exact graph loses exactly its offset terms,
    Add(MatMulNBits(x), MatMul(ReduceSum(Reshape(x)), offset)), four nodes per 4-bit linear; every
    MatMulNBits output feeds what the Add fed; the graph still runs, and its logits move (the
    offsets were real)."""
    import onnx

    from exporters.export import export
    from test_int4_form import GGUF_SEED, write_tiny_gguf

    gguf = tmp_path / "tiny-Q4_1.gguf"
    write_tiny_gguf(gguf, "Q4_1", GGUF_SEED["Q4_1"])
    pkg = export(gguf, tmp_path / "pkg", variants=("static",), verify=False)
    before = onnx.load(str(pkg / "model.static.onnx"), load_external_data=False)
    out = graph_patch.patch_package(pkg, "static", tmp_path / "patched", ["no-offsets"])
    after = onnx.load(str(out), load_external_data=False)

    def count(model, op):
        return sum(n.op_type == op for n in model.graph.node)

    linears = sum(n.op_type == "MatMulNBits" and "embed" not in n.input[1] for n in before.graph.node)
    assert linears > 0
    for op in ("ReduceSum", "MatMul", "Add"):
        assert count(before, op) - count(after, op) == linears, op
    assert count(before, "MatMulNBits") == count(after, "MatMulNBits")
    produced = {o for n in after.graph.node for o in n.output} | {i.name for i in after.graph.input} \
        | {t.name for t in after.graph.initializer} | {""}
    assert all(i in produced for n in after.graph.node for i in n.input)  # nothing left dangling

    rng = np.random.default_rng(SEED)
    prompt = rng.integers(0, 256, (1, 7)).astype(np.int64)
    print("seed", SEED, "prompt", prompt.tolist())
    exact, dropped = (_decode(_engine(folder, "static"), prompt, 2, greedy=False) for folder in (pkg, out.parent))
    assert all(np.isfinite(d).all() for d in dropped)
    assert max(float(np.abs(a - b).max()) for a, b in zip(exact, dropped)) > 1e-3


@pytest.mark.parametrize("source", ["gguf-q4_1", "float"])
def test_dense_keeps_the_exact_graphs_results(source, int4_package, tmp_path):
    """dense: every float-activation 4-bit linear of the exact static graph (with its Q4_1 offset
    term, where the source has one) becomes one fp32 MatMul over the dequantized weight; no
    MatMulNBits at float activations is left, and the logits are the unpatched graph's to fp32
    rounding, step after step (batch rows too)."""
    import onnx

    from exporters.export import export
    from test_int4_form import GGUF_SEED, write_tiny_gguf

    if source == "gguf-q4_1":
        gguf = tmp_path / "tiny-Q4_1.gguf"
        write_tiny_gguf(gguf, "Q4_1", GGUF_SEED["Q4_1"])
        pkg = export(gguf, tmp_path / "pkg", variants=("static",), verify=False)
    else:
        pkg = int4_package
    out = graph_patch.patch_package(pkg, "static", tmp_path / "dense", ["dense"])
    before = onnx.load(str(pkg / "model.static.onnx"), load_external_data=False)
    after = onnx.load(str(out), load_external_data=False)
    exact_nbits = [n for n in before.graph.node if n.op_type == "MatMulNBits" and graph_patch._attr(n, "accuracy_level") == 1]
    assert exact_nbits
    assert not [n for n in after.graph.node if n.op_type == "MatMulNBits" and graph_patch._attr(n, "accuracy_level") == 1]
    if source == "gguf-q4_1":  # the offset terms went into the weights
        assert sum(n.op_type == "ReduceSum" for n in after.graph.node) < sum(n.op_type == "ReduceSum" for n in before.graph.node)
    rng = np.random.default_rng(SEED + 7)
    prompt = rng.integers(0, 256, (1, 8)).astype(np.int64)
    print("seed", SEED + 7, "prompt", prompt.tolist())
    want = _decode(_engine(pkg, "static"), prompt, 4, greedy=False)
    got = _decode(_engine(out.parent, "static"), prompt, 4, greedy=False)
    for w, g in zip(want, got):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)
    rows = rng.integers(0, 256, (3, 5)).astype(np.int64)  # a batch prefill
    outs = []
    for folder in (pkg, out.parent):
        e = _engine(folder, "static")
        outs.append(e.forward(rows, np.ones_like(rows), e.new_cache(3, capacity=8)))
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-4, atol=1e-4)
