"""AWQ and GPTQ checkpoints: tiny synthetic ones written in their packed layouts, exported exactly.

The packers below are written from the formats' documentation (AutoAWQ's GEMM packing with its
interleaved order, GPTQ's sequential packing with v1's "zeros - 1"), and a second, independent
dequantizer (shift, mask, reverse the AWQ order, "zeros + 1") cross-checks the reader. The exported
graphs must compute with exactly (q - z) * s: their logits match transformers' float model on the
dequantized weights to fp32 tolerance. Random values come from a fresh, printed seed
(``AWQ_SEED=<seed>`` reruns one).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import onnx
import pytest

from exporters.awq_gptq import QuantSpec, read_weight
from exporters.hf_source import HFSource
from portable_infer.errors import SourceError, UnsupportedArchitectureError

SEED = int(os.environ.get("AWQ_SEED") or random.SystemRandom().randrange(2**31))
ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ GEMM: nibble k of a word holds output column ORDER[k]
TINY = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
            head_dim=32, num_hidden_layers=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
            pad_token_id=0, tie_word_embeddings=False)
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def tag(extra: str = "") -> str:
    return f"[AWQ_SEED={SEED}{', ' + extra if extra else ''}]"


# --- packers: the inverse of the documented formats -------------------------------------------
def pack_words(nibbles: np.ndarray) -> np.ndarray:
    """[..., 8] values 0..15 -> [...] int32, value k at bits 4k..4k+3."""
    words = np.zeros(nibbles.shape[:-1], np.uint32)
    for k in range(8):
        words |= nibbles[..., k].astype(np.uint32) << np.uint32(4 * k)
    return words.view(np.int32)


def pack_awq(m: np.ndarray) -> np.ndarray:
    """[rows, cols] -> [rows, cols/8]: word c holds columns 8c + ORDER[k] in nibble k."""
    rows, cols = m.shape
    grouped = m.reshape(rows, cols // 8, 8)
    return pack_words(grouped[..., ORDER])


def pack_gptq_qweight(q_in_out: np.ndarray) -> np.ndarray:
    """[in, out] -> [in/8, out]: word row p holds input rows 8p..8p+7."""
    n_in, n_out = q_in_out.shape
    return pack_words(q_in_out.reshape(n_in // 8, 8, n_out).transpose(0, 2, 1))


def pack_gptq_qzeros(z: np.ndarray, v1: bool) -> np.ndarray:
    """[groups, out] -> [groups, out/8], sequential; v1 subtracts 1 from every zero point as one
    int32 subtraction (what GPTQModel's v2->v1 conversion writes)."""
    words = pack_words(z.reshape(z.shape[0], -1, 8)).view(np.uint32)
    if v1:
        words = words - np.uint32(0x11111111)
    return words.view(np.int32)


# --- an independent dequantizer, written from the formats' documentation ------------------------
def reference_dequant(method: str, qweight, qzeros, scales, group: int, v1: bool) -> np.ndarray:
    """W [out, in] float32: unpack with shifts and masks, undo AWQ's order, apply v1's zeros + 1."""
    shifts = np.arange(0, 32, 4)
    unpack = lambda w: (w[..., None].astype(np.int64) >> shifts) & 0xF  # noqa: E731  [..., n, 8]
    if method == "awq":
        reverse = [0, 4, 1, 5, 2, 6, 3, 7]
        iw = unpack(qweight)[..., reverse].reshape(qweight.shape[0], -1)
        iz = unpack(qzeros)[..., reverse].reshape(qzeros.shape[0], -1)
    else:
        iw = unpack(qweight).transpose(0, 2, 1).reshape(-1, qweight.shape[1])
        iz = unpack(qzeros).reshape(qzeros.shape[0], -1)
        if v1:
            iz = iz + 1  # AutoGPTQ's historic convention, valid where no zero point was 0
    iz = np.repeat(iz, group, axis=0)
    s = np.repeat(scales.astype(np.float32), group, axis=0)
    return ((iw - iz) * s).T.astype(np.float32)


# --- synthetic checkpoints --------------------------------------------------------------------
def random_layer(rng, n_out: int, n_in: int, group: int, zero_range=(0, 16)):
    q = rng.integers(0, 16, (n_in, n_out), dtype=np.uint8)
    z = rng.integers(*zero_range, (n_in // group, n_out), dtype=np.uint8)
    s = rng.uniform(0.004, 0.02, (n_in // group, n_out)).astype(np.float16)
    return q, z, s


def packed_parts(method: str, q, z, s, v1: bool) -> dict:
    if method == "awq":
        return {"qweight": pack_awq(q), "qzeros": pack_awq(z), "scales": s}
    n_in = q.shape[0]
    return {"qweight": pack_gptq_qweight(q), "qzeros": pack_gptq_qzeros(z, v1), "scales": s,
            "g_idx": (np.arange(n_in) // (n_in // z.shape[0])).astype(np.int32)}


def quant_config(method: str, group: int, v1: bool = True) -> dict:
    if method == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm"}
    return {"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": False, "sym": False,
            "checkpoint_format": "gptq" if v1 else "gptq_v2"}


def write_checkpoint(folder: Path, family: str, method: str, group: int, v1: bool, seed: int) -> dict:
    """A tiny random checkpoint of ``family`` with every layer linear in ``method``'s packing.

    Returns the float weights it stands for: ``(q - z) * s`` for the quantized linears, and the
    float tensors (embeddings, norms, biases) as stored."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    cfg = {**TINY, "model_type": family, "architectures": [f"{family.capitalize()}ForCausalLM"],
           "quantization_config": quant_config(method, group, v1)}
    E, I, Dh = TINY["hidden_size"], TINY["intermediate_size"], TINY["head_dim"]
    q_out, kv_out = TINY["num_attention_heads"] * Dh, TINY["num_key_value_heads"] * Dh
    shapes = {"self_attn.q_proj": (q_out, E), "self_attn.k_proj": (kv_out, E), "self_attn.v_proj": (kv_out, E),
              "self_attn.o_proj": (E, q_out), "mlp.gate_proj": (I, E), "mlp.up_proj": (I, E),
              "mlp.down_proj": (E, I)}
    tensors, floats = {}, {}
    vocab = TINY["vocab_size"]
    for name, shape in (("model.embed_tokens.weight", (vocab, E)), ("lm_head.weight", (vocab, E))):
        floats[name] = (0.08 * rng.standard_normal(shape)).astype(np.float16).astype(np.float32)
    floats["model.norm.weight"] = (1 + 0.2 * rng.standard_normal(E)).astype(np.float32)
    for i in range(TINY["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            floats[p + norm + ".weight"] = (1 + 0.2 * rng.standard_normal(E)).astype(np.float32)
        if family == "qwen2":
            for r in "qkv":
                floats[p + f"self_attn.{r}_proj.bias"] = (0.2 * rng.standard_normal(shapes[f"self_attn.{r}_proj"][0])
                                                          ).astype(np.float32)
        for lin in LINEARS:
            n_out, n_in = shapes[lin]
            q, z, s = random_layer(rng, n_out, n_in, group, (1, 16) if v1 and method == "gptq" else (0, 16))
            for part, arr in packed_parts(method, q, z, s, v1).items():
                tensors[p + f"{lin}.{part}"] = arr
            dq = (q.astype(np.float32) - np.repeat(z, group, axis=0)) * np.repeat(s.astype(np.float32), group, axis=0)
            floats[p + lin + ".weight"] = dq.T.copy()
    for name, w in floats.items():
        if not name.endswith("proj.weight"):
            tensors[name] = w.astype(np.float16) if "embed" in name or "lm_head" in name else w
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(cfg))
    return floats


# --- the reader -------------------------------------------------------------------------------
@pytest.mark.parametrize("method,v1", [("awq", False), ("gptq", True), ("gptq", False)])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_read_weight_is_exact_and_matches_reference_dequantizer(method, v1, group):
    seed = SEED + group + (7 if v1 else 0) + (100 if method == "awq" else 0)
    rng = np.random.default_rng(seed)
    n_out, n_in = 48, 256
    q, z, s = random_layer(rng, n_out, n_in, group, (1, 16) if v1 else (0, 16))
    parts = packed_parts(method, q, z, s, v1)
    spec = QuantSpec(method, 4, group, 1 if v1 else 2)
    blocks = read_weight(spec, parts, "layer")
    truth = ((q.astype(np.float32) - np.repeat(z, group, 0)) * np.repeat(s.astype(np.float32), group, 0)).T
    assert blocks.shape == (n_out, n_in) and blocks.block == group and blocks.kind == "int4", tag()
    np.testing.assert_array_equal(blocks.q, q.T, err_msg=tag("q"))
    np.testing.assert_array_equal(blocks.zero, z.T, err_msg=tag("zero points"))
    np.testing.assert_array_equal(blocks.dequantize(), truth, err_msg=tag("(q - z) * s"))
    ref = reference_dequant(method, parts["qweight"], parts["qzeros"], s, group, v1)
    np.testing.assert_array_equal(blocks.dequantize(), ref, err_msg=tag("reference dequantizer"))


def test_gptq_v1_zero_point_zero_round_trips():
    """A v1 zero point of 0 is stored as -1 with a borrow from the next nibble; reading the word
    back with + 0x11111111 undoes it (a nibble-wise + 1 would not)."""
    z = np.zeros((1, 8), np.uint8)
    z[0, 1:] = [5, 0, 15, 1, 0, 7, 3]
    words = pack_gptq_qzeros(z, v1=True)
    spec = QuantSpec("gptq", 4, 32, 1)
    q = np.full((32, 8), 9, np.uint8)
    parts = {"qweight": pack_gptq_qweight(q), "qzeros": words, "scales": np.ones((1, 8), np.float16)}
    blocks = read_weight(spec, parts, "x")
    np.testing.assert_array_equal(blocks.zero[:, 0], z[0])


# --- export parity ----------------------------------------------------------------------------
CASES = [("llama", "awq", 32, False), ("qwen2", "awq", 128, False), ("llama", "gptq", 64, True),
         ("qwen2", "gptq", 128, False)]


@pytest.mark.parametrize("family,method,group,v1", CASES, ids=lambda c: str(c))
def test_export_matches_transformers_on_dequantized_weights(tmp_path, family, method, group, v1):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from exporters.export import export
    from exporters.quant import quantize
    from exporters.verify import all_logits, decoder
    from portable_infer.package.manifest import Manifest
    from portable_infer.package.variants import FP32_REL_TOL

    seed = SEED + CASES.index((family, method, group, v1))
    floats = write_checkpoint(tmp_path / "hf", family, method, group, v1, seed)
    src = HFSource.open(tmp_path / "hf")
    assert src.default_precision == "int4" and src.quantization.group == group, tag()
    pkg = export(tmp_path / "hf", tmp_path / "pkg", verify=False, head_accuracy=1,
                 variants=("portable", "fused", "static"))
    manifest = Manifest.load(pkg)
    assert manifest.precision == "int4", tag()

    # the reference: transformers' float model holding the weights the package holds (the int4
    # package keeps the float embedding and lm_head tables at 8 bits, as for every int4 export)
    cfg = {k: v for k, v in json.loads((tmp_path / "hf" / "config.json").read_text()).items()
           if k != "quantization_config"}
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)).eval()
    tables = ("model.embed_tokens.weight", "lm_head.weight")
    state = {n: torch.from_numpy(quantize(w, 8).dequantize() if n in tables else w) for n, w in floats.items()}
    model.load_state_dict(state, strict=True)

    ids = np.random.default_rng(seed).integers(1, TINY["vocab_size"], (1, 10), dtype=np.int64)
    with torch.no_grad():
        ref = model(torch.tensor(ids)).logits.float().numpy()
    for v in manifest.variants:
        ours = all_logits(decoder(pkg / v.file, v, manifest), ids)
        rel = float(np.abs(ours - ref).max()) / float(np.abs(ref).max())
        assert rel < FP32_REL_TOL, tag(f"{family} {method} g{group} {v.name}: max rel diff {rel:.2e}")

    fused = onnx.load(str(pkg / manifest.variant("fused").file), load_external_data=False)
    nbits = [n for n in fused.graph.node if n.op_type == "MatMulNBits"]
    attrs = [dict((a.name, a.i) for a in n.attribute) for n in nbits]
    layer_nodes = [n for n, a in zip(nbits, attrs) if n.input[1].startswith("model.layers.")]
    assert all(a["bits"] == 4 and a["block_size"] == group for n, a in zip(nbits, attrs) if n in layer_nodes), tag()
    assert len(layer_nodes) >= 4 * TINY["num_hidden_layers"], tag("layers run as 4-bit MatMulNBits in their groups")
    assert all(len(n.input) >= 4 and n.input[3] for n in layer_nodes), tag("with zero points")


@pytest.mark.parametrize("method,group,v1", [("awq", 64, False), ("gptq", 128, True)])
def test_export_verifies_against_dequantized_reference(tmp_path, method, group, v1):
    """export(verify=True) builds the float reference itself (no AWQ kernels: awq_gptq.reference_model,
    the fp16 tables at the package's 8 bits) and every graph matches it to fp32 rounding, not only on
    the agreement gate. The lm_head runs float activations (head_accuracy=1): at the default 4 the
    fused head quantizes them to int8, which is not exact by design."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from exporters.export import export
    from portable_infer.package.manifest import Manifest
    from portable_infer.package.variants import FP32_REL_TOL

    write_checkpoint(tmp_path / "hf", "llama", method, group, v1, SEED)
    pkg = export(tmp_path / "hf", tmp_path / "pkg", variants=("portable", "fused", "static"), head_accuracy=1)
    report = Manifest.load(pkg).verification
    for name in ("portable", "fused", "static"):
        r = report[name]
        print(f"{method} {name}: full {r.full}, cached {r.cached}, {r.quality.agree_steps}")
        assert max(r.full.max_rel, r.cached.max_rel) < FP32_REL_TOL, tag(f"{method} {name}: {r.full}, {r.cached}")
        assert r.quality.top1_agreement >= 0.98, tag(f"{method} {name}: {r.quality}")


# --- refusals ---------------------------------------------------------------------------------
@pytest.mark.parametrize("change,param", [
    ({"desc_act": True}, "desc_act"),
    ({"bits": 8}, "bits"),
    ({"group_size": 256}, "group_size"),
    ({"group_size": -1}, "group_size"),
    ({"checkpoint_format": "marlin"}, "checkpoint_format"),
    ({"quant_method": "bitsandbytes"}, "quant_method"),
])
def test_unsupported_gptq_settings_are_refused(tmp_path, change, param):
    write_checkpoint(tmp_path / "hf", "llama", "gptq", 32, False, SEED)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["quantization_config"].update(change)
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SourceError) as err:
        HFSource.open(tmp_path / "hf")
    assert err.value.param == param and err.value.reason == "unsupported"


@pytest.mark.parametrize("change", [{"version": "gemv"}, {"zero_point": False}])
def test_unsupported_awq_settings_are_refused(tmp_path, change):
    write_checkpoint(tmp_path / "hf", "llama", "awq", 32, False, SEED)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["quantization_config"].update(change)
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SourceError, match="AWQ"):
        HFSource.open(tmp_path / "hf")


def test_act_order_g_idx_is_refused_with_the_fix(tmp_path):
    from safetensors.numpy import load_file, save_file

    write_checkpoint(tmp_path / "hf", "llama", "gptq", 32, False, SEED)
    path = tmp_path / "hf" / "model.safetensors"
    tensors = load_file(str(path))
    name = "model.layers.0.self_attn.q_proj.g_idx"
    tensors[name] = np.random.default_rng(SEED).permutation(tensors[name])
    save_file(tensors, str(path))
    src = HFSource.open(tmp_path / "hf")
    with pytest.raises(SourceError, match="desc_act=False") as err:
        src.get("model.layers.0.self_attn.q_proj.weight")
    assert err.value.param == "g_idx"
    src.get("model.layers.0.self_attn.k_proj.weight")  # the trivial g_idx of the others reads fine


def test_side_file_config_and_unregistered_family(tmp_path):
    write_checkpoint(tmp_path / "hf", "llama", "gptq", 32, False, SEED)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "quantize_config.json").write_text(json.dumps(cfg.pop("quantization_config")))
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    assert HFSource.open(tmp_path / "hf").quantization == QuantSpec("gptq", 4, 32, 2)
    cfg["model_type"] = "not_a_family"
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedArchitectureError, match="direct graph builder"):
        HFSource.open(tmp_path / "hf")


def test_a_block_size_is_refused_for_a_pre_quantized_checkpoint(tmp_path):
    """export(block=128) on an AWQ checkpoint: its groups are kept, so the option would be ignored."""
    from exporters.export_plan import plan_export
    from exporters.sources import open_source
    from portable_infer.errors import InvalidArgumentError

    write_checkpoint(tmp_path / "hf", "llama", "awq", 64, False, SEED)
    with pytest.raises(InvalidArgumentError) as info:
        plan_export(open_source(tmp_path / "hf"), block=128)
    assert info.value.param == "block" and "pre-quantized checkpoint" in str(info.value)
