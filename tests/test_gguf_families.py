"""GGUF files of every registered family, as llama.cpp's converter writes them, exported exactly.

Each family's tiny random model (hidden 256, 2 layers: K-quant rows hold 256-element
super-blocks) is written to GGUF by tests/_gguf_files.py (names from gguf-py's TensorNameMap,
the converter's tensor changes reimplemented there) and exported; the reference is transformers
(``from_config``) on ``gguf.quants.dequantize`` of the file. Two files per family:

* "every type": the eight block types the issue names (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K,
  Q6_K) assigned round-robin over the 2-D tensors, so every family reads every type;
* "Q4_K_M": llama.cpp's default mix (Q4_K, Q6_K for attn_v / ffn_down / output, Q5_0 token
  embeddings, Q8_0 attn_output here), F32 norms.

The portable graph computes with the dequantized weights to fp32 rounding (``REL_TOL`` on all
logits, left padding and the KV cache included, 16 greedy tokens identical). The fused graphs'
lm_head runs int8 activations except for its top 16 candidates, so they are compared on the
reference's top 8 of the last position, to fp32 rounding too (``FUSED_TOL``; their Q4_1-form
layers add the block offsets as the float term ``blocksum(x) @ m``).
Run with ``-s`` for the measured differences. Seeds are fixed per family (files are built once);
the prompts come from ``GGUF_SEED`` (printed; set it to replay).
"""

from __future__ import annotations

import itertools
import os
import random

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

import _gguf_files as gf  # noqa: E402

from exporters.architectures import FAMILIES  # noqa: E402
from exporters.export import export  # noqa: E402
from exporters.verify import compare, decoder  # noqa: E402
from portable_infer.package.variants import FP32_REL_TOL  # noqa: E402
from portable_infer.package.manifest import Manifest  # noqa: E402

SEED = int(os.environ.get("GGUF_SEED") or random.SystemRandom().randrange(2**31))
FILE_SEED = {f: 4100 + i for i, f in enumerate(gf.FAMILIES)}
BRIEF_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K")
FUSED_TOL = FP32_REL_TOL  # fused/static vs reference, top candidates (measured <= 2e-6)
MEASURED: dict[str, dict] = {}


def every_type():
    cycle = itertools.cycle(BRIEF_TYPES)
    return lambda name, shape: "F32" if name.startswith("position_embd") else next(cycle)


def q4_k_m(name: str, shape) -> str:
    if name.startswith("position_embd"):
        return "F32"
    if name == "token_embd.weight":
        return "Q5_0"
    if name.endswith(("attn_v.weight", "ffn_down.weight")) or name == "output.weight":
        return "Q6_K"
    if name.endswith("attn_output.weight"):
        return "Q8_0"
    return "Q4_K"


MIXES = {"every-type": every_type, "q4_k_m": lambda: q4_k_m}


@pytest.fixture(scope="module", params=[(f, m) for f in gf.FAMILIES for m in MIXES], ids=lambda p: f"{p[0]}-{p[1]}")
def exported(request, tmp_path_factory):
    """(family, mix, GGUF path, {tensor: type}, package with portable + fused (+ static), reference)."""
    family, mix = request.param
    root = tmp_path_factory.mktemp(f"gguf_{family}_{mix}")
    path = root / "model.gguf"
    types = gf.write_gguf(gf.hf_model(family, FILE_SEED[family]), family, path, MIXES[mix](), FILE_SEED[family])
    variants = ("portable", "fused", "static") if family not in ("gemma3", "gpt2") else ("portable", "fused")
    pkg = export(path, root / "pkg", variants=variants, verify=False)
    return family, mix, path, types, pkg, gf.reference_model(family, path, FILE_SEED[family])


def test_every_family_reads_the_types_it_was_written_with(exported):
    family, mix, path, types, pkg, _ = exported
    used = {t for t in types.values() if t != "F32"}
    assert used == (set(BRIEF_TYPES) if mix == "every-type" else {"Q4_K", "Q6_K", "Q5_0", "Q8_0"})
    m = Manifest.load(pkg)
    assert m.model.architecture == family
    assert m.source["kind"] == "gguf"


def test_portable_graph_matches_transformers_on_the_dequantized_weights(exported):
    family, mix, path, _, pkg, ref = exported
    m = Manifest.load(pkg)
    rng = np.random.default_rng(SEED)
    report = compare(ref, decoder(pkg / m.variant("portable").file, m.variant("portable"), m), 256, rng)
    MEASURED.setdefault(f"{family}-{mix}", {})["portable"] = report.full.max_rel
    msg = f"GGUF_SEED={SEED} {family} {mix}: {report}"
    assert report.full.max_rel <= FP32_REL_TOL, msg
    assert report.cached.max_rel <= FP32_REL_TOL, msg
    assert report.greedy.identical_prefix == report.greedy.steps, msg


def test_fused_graphs_match_on_the_top_candidates(exported):
    family, mix, path, _, pkg, ref = exported
    m = Manifest.load(pkg)
    ids = np.random.default_rng(SEED).integers(3, 256, (1, 12))
    with torch.no_grad():
        expected = ref(torch.from_numpy(ids)).logits.numpy()[0, -1]
    top = np.argsort(-expected)[:8]
    for v in m.variants:
        if v.name == "portable":
            continue
        dec = decoder(pkg / v.file, v, m)
        got = dec.run(ids, np.ones_like(ids), dec.empty_past(1))[0][0, -1]
        rel = float(np.abs(got[top] - expected[top]).max() / np.abs(expected[top]).max())
        MEASURED.setdefault(f"{family}-{mix}", {})[v.name] = rel
        assert rel <= FUSED_TOL, f"GGUF_SEED={SEED} {family} {mix} {v.name}: top-8 max rel {rel:.2e}"
        # The fused pick is the reference's top token or a tie within both graphs' tolerance.
        gap = float(expected.max() - expected[got.argmax()]) / np.abs(expected[top]).max()
        assert gap <= 2 * FUSED_TOL, f"GGUF_SEED={SEED} {family} {mix} {v.name}: picked {got.argmax()}, gap {gap:.2e}"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_gguf_names_are_the_converters(family):
    """Each family's GGUF table agrees with gguf-py's TensorNameMap (what convert_hf_to_gguf.py uses)."""
    spec = FAMILIES[family].GGUF
    key = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == spec.arch)
    table = gguf.get_tensor_name_map(key, 2)
    for g, h in spec.names.items():
        base, _, suffix = h.format(i=1).rpartition(".")
        assert f"{table.get_name(base)}.{suffix}" == g.format(i=1), (family, g, h)


def test_print_measured():
    """Run with -s: the measured max relative logit differences per family and file."""
    for case, values in sorted(MEASURED.items()):
        print(case, {k: f"{v:.1e}" for k, v in values.items()})


# --- what the reader refuses ---------------------------------------------------------------------
def _llama_file(tmp_path, **kwargs):
    path = tmp_path / "m.gguf"
    gf.write_gguf(gf.hf_model("llama", 3), "llama", path, lambda n, s: "Q8_0", 3, **kwargs)
    return path


def test_tensors_the_family_does_not_know_are_refused(tmp_path):
    from exporters.gguf_source import GGUFSource
    from portable_infer.errors import UnsupportedArchitectureError

    path = _llama_file(tmp_path, extra_tensors={"blk.0.attn_sinks.weight": np.ones(4)})
    with pytest.raises(UnsupportedArchitectureError, match="blk.0.attn_sinks.weight"):
        GGUFSource.open(path)


def test_an_unknown_architecture_lists_the_supported_ones(tmp_path):
    from exporters.gguf_source import GGUFSource
    from portable_infer.errors import UnsupportedArchitectureError

    path = tmp_path / "bloom.gguf"
    w = gguf.GGUFWriter(str(path), "bloom")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.ones((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedArchitectureError, match="'bloom'.*gemma3, gpt2, llama, phi3, qwen2, qwen3"):
        GGUFSource.open(path)


def test_rope_scaling_the_builder_lacks_is_refused(tmp_path):
    from exporters.gguf_source import GGUFSource
    from portable_infer.errors import UnsupportedArchitectureError

    def yarn(w):
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(4.0)
    with pytest.raises(UnsupportedArchitectureError, match="yarn"):
        GGUFSource.open(_llama_file(tmp_path, edit_metadata=yarn))


def test_phi3_longrope_is_refused(tmp_path):
    from exporters.gguf_source import GGUFSource
    from portable_infer.errors import UnsupportedArchitectureError

    path = tmp_path / "phi3.gguf"
    factors = {"rope_factors_long.weight": np.ones(32), "rope_factors_short.weight": np.ones(32)}
    gf.write_gguf(gf.hf_model("phi3", 3), "phi3", path, lambda n, s: "Q8_0", 3, extra_tensors=factors)
    with pytest.raises(UnsupportedArchitectureError, match="LongRoPE"):
        GGUFSource.open(path)


def test_missing_metadata_names_the_key():
    from exporters.architectures.gguf_spec import GGUFView
    from portable_infer.errors import SourceError

    with pytest.raises(SourceError, match="llama.block_count") as err:
        GGUFView("llama", {}, {}, None, "m.gguf").need("block_count")
    assert err.value.param == "llama.block_count" and err.value.reason == "missing"


def test_transformers_reference_gets_llama3_rope_factors():
    """transformers' GGUF loader ignores rope_freqs.weight; verification aligns its reference."""
    from types import SimpleNamespace

    from exporters.gguf_source import GGUFSource

    model = gf.hf_model("mistral", 3)  # plain RoPE, as transformers loads a llama GGUF
    before = model.model.rotary_emb.inv_freq.clone()
    factors = np.linspace(1, 8, before.numel()).astype(np.float32)
    src = SimpleNamespace(config={"rope_scaling": {"rope_type": "freq_factors", "factors": factors.tolist()}})
    GGUFSource.align_reference(src, model)
    np.testing.assert_allclose(model.model.rotary_emb.inv_freq.numpy(), before.numpy() / factors, rtol=1e-7)


def test_gemma3_metadata_follows_llama_cpp():
    """Sliding-window pattern (default 6, an int or per-layer flags), local RoPE base 10000 unless
    rope.freq_base_swa, attention scale 1/sqrt(head_dim) except the 62-layer 27B model's."""
    from exporters.architectures import gemma3
    from exporters.architectures.gguf_spec import GGUFView

    def config(layers, **extra):
        keys = {"block_count": layers, "embedding_length": 5376, "feed_forward_length": 21504,
                "attention.head_count": 32, "attention.head_count_kv": 16, "attention.key_length": 128,
                "attention.sliding_window": 1024, "rope.freq_base": 1e6, **extra}
        meta = {f"gemma3.{k}": v for k, v in keys.items()}
        return gemma3.gguf_config(GGUFView("gemma3", meta, {"token_embd.weight": (262144, 5376)}, None))

    c = config(12)
    assert c["layer_types"][:6] == ["sliding_attention"] * 5 + ["full_attention"]
    assert c["rope_parameters"]["sliding_attention"]["rope_theta"] == 10000.0
    assert c["rope_parameters"]["full_attention"]["rope_theta"] == 1e6
    assert c["query_pre_attn_scalar"] == 128 and config(62)["query_pre_attn_scalar"] == 168
    assert config(4, **{"attention.sliding_window_pattern": 2})["layer_types"] == ["sliding_attention",
                                                                                  "full_attention"] * 2
    assert config(2, **{"rope.freq_base_swa": 5e4})["rope_parameters"]["sliding_attention"]["rope_theta"] == 5e4
    assert config(2, **{"attention.sliding_window": 0})["layer_types"] == ["full_attention"] * 2
