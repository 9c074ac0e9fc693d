"""GGUF block types kept exactly: decoding, the weights the graphs compute with, package size,
and the types that cannot be kept (dequantized, with a warning).

Reference: ``gguf.quants.dequantize``. Blocks come from ``gguf.quants.quantize`` where it can
(Q4_0, Q4_1, Q5_0, Q5_1, Q8_0), from tests/_gguf_files.quantize_k for Q2_K/Q4_K/Q5_K/Q6_K, and as
random valid bytes otherwise (and for every type in the decoding test, with zero scales in).
Randomness: ``np.random.default_rng(seed)`` with a printed seed (``GGUF_QUANT_SEED`` replays).
"""

from __future__ import annotations

import logging
import os
import random

import numpy as np
import pytest
from onnx import TensorProto

gguf = pytest.importorskip("gguf")

import _gguf_files as gf  # noqa: E402
from _quant import _Source  # noqa: E402

from exporters.gguf_blocks import EXACT_TYPES, decode  # noqa: E402
from exporters.graph import GraphBuilder  # noqa: E402
from exporters.quant import Blocks  # noqa: E402
from exporters.lowering.linear import linear  # noqa: E402
from exporters.weights import WeightForm, WeightStore  # noqa: E402

OFFSET_FORMS = ("Q4_1", "Q4_K", "Q2_K")  # q4_1 form: fused graphs carry m as 4-bit remainders
# fp16 scale fields: byte offsets per block (random bytes elsewhere)
F16_AT = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0], "Q2_K": [80, 82],
          "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208], "IQ4_NL": [0], "IQ4_XS": [0], "TQ2_0": [64]}


@pytest.fixture
def seed() -> int:
    s = int(os.environ.get("GGUF_QUANT_SEED") or random.SystemRandom().randrange(2**31))
    print(f"GGUF_QUANT_SEED={s}")
    return s


def random_bytes(qtype: str, rows: int, cols: int, rng) -> np.ndarray:
    """Any bytes, with finite fp16 scales (one of them 0): every code and sub-scale pattern."""
    per, size = gguf.GGML_QUANT_SIZES[gf.T[qtype]]
    raw = rng.integers(0, 256, (rows, cols // per, size), dtype=np.uint8)
    for at in F16_AT[qtype]:
        d = (0.01 * rng.standard_normal((rows, cols // per))).astype(np.float16)
        d[0, 0] = 0
        raw[..., at:at + 2] = d[..., None].view(np.uint8)
    return raw.reshape(rows, -1)


def realistic(qtype: str, rows: int, cols: int, rng) -> np.ndarray:
    x = 0.08 * rng.standard_normal((rows, cols)).astype(np.float32)
    x[: rows // 4] += 0.1  # blocks off zero: offsets and zero points matter
    if qtype in gf.QUANTIZABLE or qtype in gf.K_QUANTIZED:
        return gf.encode(x, qtype, rng)
    return gf.random_blocks(qtype, rows, cols, rng)


# --- the blocks ----------------------------------------------------------------------------------
@pytest.mark.parametrize("qtype", EXACT_TYPES)
def test_decoded_blocks_reproduce_gguf_dequantize_bit_for_bit(qtype, seed):
    rng = np.random.default_rng(seed)
    for raw in (random_bytes(qtype, 8, 512, rng), realistic(qtype, 8, 512, rng)):
        b = decode(qtype, raw, 8, 512)
        np.testing.assert_array_equal(b.dequantize(), gguf.quants.dequantize(raw, gf.T[qtype]).reshape(8, 512))
        np.testing.assert_array_equal(b.scale_parts.value(), b.scale)  # the factors the graph multiplies
        if b.offset is not None:
            np.testing.assert_array_equal(b.offset_parts.value(), b.offset)
            assert (b.scale != 0).all(), "offset forms must not hold zero scales (MatMulNBits divides by them)"
        assert b.bits == (4 if b.kind in ("q4_0", "q4_1") else 8)


def test_old_kind_names_still_decode(seed):
    rng = np.random.default_rng(seed)
    raw = realistic("Q4_1", 4, 64, rng)
    np.testing.assert_array_equal(decode("q4_1", raw, 4, 64).dequantize(), decode("Q4_1", raw, 4, 64).dequantize())


def test_row_operations_keep_the_factored_scales(seed):
    rng = np.random.default_rng(seed)
    a = decode("Q4_K", realistic("Q4_K", 8, 512, rng), 8, 512)
    b = decode("Q4_K", realistic("Q4_K", 4, 512, rng), 4, 512)
    for blocks in (a.take_rows(rng.permutation(8)), Blocks.concat_rows([a, b]), *a.split_rows([3, 5])):
        np.testing.assert_array_equal(blocks.scale_parts.value(), blocks.scale)
        np.testing.assert_array_equal(blocks.offset_parts.value(), blocks.offset)
    mixed = Blocks.concat_rows([a, Blocks(a.kind, a.q, a.scale, a.zero, a.offset, a.block)])
    assert mixed.scale_parts is None and mixed.offset is not None  # falls back to the fp32 arrays


# --- the weights each graph computes with --------------------------------------------------------
def graph_weights(b: Blocks, fused: bool, int4_fit: bool = False, accuracy: int = 1) -> np.ndarray:
    """The [out, in] weights one linear of the portable (DequantizeLinear) or fused (MatMulNBits,
    float activations; ``int4_fit``: as the -q4 graphs store it; ``accuracy`` 4: as the int8-activation
    graphs store it, whose one-hot rows int8 quantization keeps exactly) graph applies: its output
    for the identity matrix."""
    import onnxruntime as ort

    n, k = b.shape
    g = GraphBuilder("linear", None)
    store = WeightStore(g, _Source({"w": b}), WeightForm("int4", nbits_accuracy=accuracy if fused else None, head_accuracy=4,
                                                         int4_fit=int4_fit))
    g.input("x", TensorProto.FLOAT, [1, "s", k])
    g.output(linear(store, "x", "w"), "y", TensorProto.FLOAT, [1, "s", n])
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(accuracy))  # as the runtime
    sess = ort.InferenceSession(g.model("test").SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": np.eye(k, dtype=np.float32)[None]})[0][0].T


@pytest.mark.parametrize("qtype", EXACT_TYPES)
def test_graphs_compute_with_the_gguf_weights(qtype, seed):
    """Portable: bit for bit. Fused (float activations, the exact graphs): bit for bit, Q4_1-form
    blocks to fp32 rounding (their offsets as the float term ``blocksum(x) @ m``). The
    int8-activation graphs fold Q4_1-form offsets into two stages of 4-bit remainder rows
    (weight_ops.WeightOps.augment), which hold each row's remainders to a fraction of its largest
    step: within 1/100 of it (measured: about 1/500)."""
    rng = np.random.default_rng(seed)
    raw = realistic(qtype, 64, 512, rng)
    exact = gguf.quants.dequantize(raw, gf.T[qtype]).reshape(64, 512)
    b = decode(qtype, raw, 64, 512)
    np.testing.assert_array_equal(graph_weights(b, fused=False), exact)
    fused = graph_weights(b, fused=True)
    if qtype in OFFSET_FORMS:
        step = np.abs(b.scale).max(axis=1, keepdims=True)
        worst = float((np.abs(fused - exact) / np.maximum(np.abs(exact), step)).max())
        print(f"{qtype}: fused weights within {worst:.1e} of gguf's (relative)")
        assert worst <= 1e-6  # fp32 rounding of d*(q - z) + m
        folded = graph_weights(b, fused=True, accuracy=4)
        worst = float((np.abs(folded - exact) / step).max())
        print(f"{qtype}: int8-activation graphs' weights within {worst:.4f} of the row's largest step of gguf's")
        assert worst <= 1 / 100
    else:
        np.testing.assert_array_equal(fused, exact)


# --- what the reader does with the types it cannot keep ------------------------------------------
def test_inexact_types_are_dequantized_with_one_warning_per_type(tmp_path, caplog, seed):
    from exporters.gguf_source import GGUFSource

    kinds = {"blk.0.attn_q.weight": "IQ2_XXS", "blk.1.attn_q.weight": "IQ2_XXS", "blk.0.ffn_up.weight": "TQ1_0",
             "blk.0.ffn_down.weight": "F16", "blk.1.ffn_down.weight": "BF16"}
    model = gf.hf_model("llama", seed)
    path = tmp_path / "mixed.gguf"
    gf.write_gguf(model, "llama", path, lambda n, s: kinds.get(n, "Q8_0"), seed)
    with caplog.at_level(logging.WARNING, logger="exporters.gguf_source"):
        src = GGUFSource.open(path)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings
    iq2 = next(w for w in warnings if "IQ2_XXS" in w)
    assert "2 tensor(s)" in iq2 and "blk.0.attn_q.weight" in iq2 and "blk.1.attn_q.weight" in iq2
    assert "blk.0.ffn_up.weight" in next(w for w in warnings if "TQ1_0" in w)
    weights = gf.dequantized(path)
    for name in ("model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        w = src.get(name)
        assert isinstance(w, np.ndarray) and w.dtype == np.float32
        np.testing.assert_array_equal(w, weights[src._hf_to_gguf[name]])


# --- -q4 graphs: 8-bit blocks stay 8-bit ---------------------------------------------------------
@pytest.mark.parametrize("qtype", ("Q5_0", "Q5_1", "Q8_0", "Q5_K", "Q6_K", "IQ4_XS"))
def test_q4_graphs_keep_8bit_blocks_exact(qtype, seed):
    """The -q4 graphs fit 4-bit layers to MatMulNBits' integer form (int4_fit); GGUF's 8-bit block
    forms are exact 8-bit layers already and are not fitted to 4 bits (a second rounding)."""
    rng = np.random.default_rng(seed)
    raw = realistic(qtype, 64, 512, rng)
    b = decode(qtype, raw, 64, 512)
    np.testing.assert_array_equal(graph_weights(b, fused=True, int4_fit=True),
                                  gguf.quants.dequantize(raw, gf.T[qtype]).reshape(64, 512))


# --- package size --------------------------------------------------------------------------------
def test_package_is_no_larger_than_the_blocks_need(tmp_path):
    """Q4_K: 4.5 bits per weight in the GGUF; the portable graph stores the 4-bit codes and the
    K-quant scale factors as the file does (a byte per 32 weights for scales and for mins, one fp16
    per 256), so its weight file stays within 15 % of the GGUF's tensor bytes (the embedding table
    is gathered from 8-bit codes: most of the excess)."""
    from exporters.export import export

    path = tmp_path / "m.gguf"
    gf.write_gguf(gf.hf_model("llama", 12), "llama", path, lambda n, s: "Q4_K", 12)
    pkg = export(path, tmp_path / "pkg", variants=("portable",), verify=False)
    tensor_bytes = sum(int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors)
    package = (pkg / "model.onnx.data").stat().st_size
    print(f"Q4_K: GGUF tensors {tensor_bytes} B, portable weights {package} B ({package / tensor_bytes:.3f}x)")
    assert package <= 1.15 * tensor_bytes


# --- every type, end to end ----------------------------------------------------------------------
@pytest.mark.parametrize("qtype", EXACT_TYPES + ("IQ2_XXS",))
def test_each_type_exports_to_the_dequantized_logits(qtype, tmp_path, seed):
    """A llama whose every matrix is ``qtype`` against transformers on the file's dequantized
    weights: portable logits to fp32 rounding, fused ones on the top 8 candidates (Q4_1-form
    offsets as 4-bit remainders). IQ2_XXS has no
    exact form: its int4 package rounds the dequantized weights again (measured, printed), and
    an fp32 package keeps them exactly."""
    import torch

    from exporters.export import export
    from exporters.verify import decoder
    from portable_infer.package.manifest import Manifest

    path = tmp_path / "m.gguf"
    gf.write_gguf(gf.hf_model("llama", 21), "llama", path, lambda n, s: qtype, 21)
    pkg = export(path, tmp_path / "pkg", variants=("portable", "fused"), verify=False)
    ref = gf.reference_model("llama", path, 21)
    ids = np.random.default_rng(seed).integers(3, 256, (1, 12))
    with torch.no_grad():
        expected = ref(torch.from_numpy(ids)).logits.numpy()
    m = Manifest.load(pkg)
    rel = {}
    for v in m.variants:
        dec = decoder(pkg / v.file, v, m)
        got = dec.run(ids, np.ones_like(ids), dec.empty_past(1))[0]
        want = expected[:, -got.shape[1]:]
        if v.name != "portable":
            top = np.argsort(-want[0, -1])[:8]
            got, want = got[..., top], want[..., top]
        rel[v.name] = float(np.abs(got - want).max() / np.abs(want).max())
    print(f"{qtype}: max relative logit difference {rel}")
    if qtype not in EXACT_TYPES:
        pkg = export(path, tmp_path / "fp32", precision="fp32", variants=("portable",), verify=False)
        dec = decoder(pkg / "model.onnx", Manifest.load(pkg).variant("portable"), Manifest.load(pkg))
        got = dec.run(ids, np.ones_like(ids), dec.empty_past(1))[0]
        assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()
        return
    assert rel["portable"] <= 1e-4 and rel["fused"] <= 1e-4, rel  # to fp32 rounding, Q4_1-form offsets included
