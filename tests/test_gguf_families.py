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
reference's top 8 of the last position; their Q4_1-form layers (Q4_1, Q4_K) carry the block
offsets as 4-bit remainder rows (weights.WeightStore._augmented), hence ``FUSED_TOL``.
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
from exporters.verify import FP32_REL_TOL, compare, decoder  # noqa: E402
from portable_infer.manifest import Manifest  # noqa: E402

SEED = int(os.environ.get("GGUF_SEED") or random.SystemRandom().randrange(2**31))
FILE_SEED = {f: 4100 + i for i, f in enumerate(gf.FAMILIES)}
BRIEF_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K")
FUSED_TOL = 2e-3  # fused/static vs reference, top candidates: Q4_1-form offsets as 4-bit remainders
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
    """(family, mix, GGUF path, {tensor: type}, package with portable + fused (+ static))."""
    family, mix = request.param
    root = tmp_path_factory.mktemp(f"gguf_{family}_{mix}")
    path = root / "model.gguf"
    types = gf.write_gguf(gf.hf_model(family, FILE_SEED[family]), family, path, MIXES[mix](), FILE_SEED[family])
    variants = ("portable", "fused", "static") if family not in ("gemma3", "gpt2") else ("portable", "fused")
    pkg = export(path, root / "pkg", variants=variants, verify=False)
    return family, mix, path, types, pkg


def test_every_family_reads_the_types_it_was_written_with(exported):
    family, mix, path, types, pkg = exported
    used = {t for t in types.values() if t != "F32"}
    assert used == (set(BRIEF_TYPES) if mix == "every-type" else {"Q4_K", "Q6_K", "Q5_0", "Q8_0"})
    m = Manifest.load(pkg)
    assert m.model.architecture == family
    assert m.source["kind"] == "gguf"


def test_portable_graph_matches_transformers_on_the_dequantized_weights(exported):
    family, mix, path, _, pkg = exported
    ref = gf.reference_model(family, path, FILE_SEED[family])
    m = Manifest.load(pkg)
    rng = np.random.default_rng(SEED)
    report = compare(ref, decoder(pkg / m.variant("portable").file, m.variant("portable"), m), 256, rng)
    MEASURED.setdefault(f"{family}-{mix}", {})["portable"] = report["full"]["max_rel"]
    msg = f"GGUF_SEED={SEED} {family} {mix}: {report}"
    assert report["full"]["max_rel"] <= FP32_REL_TOL, msg
    assert report["cached"]["max_rel"] <= FP32_REL_TOL, msg
    assert report["greedy"]["identical_prefix"] == report["greedy"]["steps"], msg


def test_fused_graphs_match_on_the_top_candidates(exported):
    family, mix, path, _, pkg = exported
    ref = gf.reference_model(family, path, FILE_SEED[family])
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
        assert got.argmax() == expected.argmax(), f"GGUF_SEED={SEED} {family} {mix} {v.name}"


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
