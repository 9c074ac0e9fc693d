"""The fallback export route (torch.onnx export of the transformers model).

A tiny random StableLM (no direct builder: partial rotary, LayerNorm) goes through ``route="auto"``
with verification on; a registered family (tiny llama) forced through ``route="fallback"`` must
give the direct export's logits.
"""

from __future__ import annotations

import numpy as np
import pytest

from portable_infer.package import manifest as mf
from portable_infer.errors import InvalidArgumentError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")

from exporters.architectures import MODEL_TYPES  # noqa: E402
from exporters.export import export  # noqa: E402
from exporters.verify import OnnxDecoder  # noqa: E402

TINY_STABLELM = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                     num_key_value_heads=2, num_hidden_layers=2, max_position_embeddings=256,
                     bos_token_id=1, eos_token_id=127, pad_token_id=0)
SEED = 4321
PROMPT = [1, 17, 42, 99, 5, 63]


def _randomize(model, seed: int) -> None:
    """Larger random weights than transformers' init: a clear argmax makes greedy parity sharp."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.add_(0.2 * noise) if p.ndim == 1 else p.copy_(0.08 * noise)


@pytest.fixture(scope="module")
def stablelm(tmp_path_factory):
    root = tmp_path_factory.mktemp("fallback_stablelm")
    torch.manual_seed(SEED)
    model = transformers.StableLmForCausalLM(transformers.StableLmConfig(**TINY_STABLELM)).eval()
    _randomize(model, SEED)
    model.save_pretrained(root / "hf")
    package = export(root / "hf", root / "pkg", verify=True)  # route "auto"
    return model, root, package


def test_stablelm_is_not_registered():
    assert "stablelm" not in MODEL_TYPES  # otherwise this file no longer tests the fallback


def test_auto_route_exports_and_verifies_an_unregistered_architecture(stablelm):
    _, _, package = stablelm
    m = mf.Manifest.load(package)
    assert m.model.architecture == "fallback:stablelm" and m.model.model_type == "stablelm"
    assert (m.model.num_layers, m.model.num_kv_heads, m.model.head_dim) == (2, 2, 16)
    v = m.variant("portable")
    assert v.precision == "fp32" and v.logits == "all" and [x.name for x in m.variants] == ["portable"]
    assert (v.kv.layout, v.kv.growth) == ("BHSD", "concat")
    names = [mf.INPUT_IDS, mf.ATTENTION_MASK, mf.POSITION_IDS] + [n for i in range(2) for n in mf.past_names(i)]
    assert [t.name for t in v.inputs] == names
    assert [t.name for t in v.outputs] == [mf.LOGITS] + [n for i in range(2) for n in mf.present_names(i)]
    assert dict((t.name, t.shape) for t in v.inputs)["past_key_values.0.key"] == ("batch", 2, "past_sequence", 16)
    report = m.verification["portable"]
    assert report.full.max_rel < 1e-4 and report.cached.max_rel < 1e-4
    assert sorted(p.name for p in package.iterdir() if p.name.startswith("model")) == ["model.onnx", "model.onnx.data"]


def test_runtime_greedy_equals_transformers(stablelm):
    import portable_infer

    model, _, package = stablelm
    ours = portable_infer.load(package, "cpu", intra_op_threads=1).generate_ids(PROMPT, max_new_tokens=10)
    with torch.no_grad():
        ref = model.generate(torch.tensor([PROMPT]), max_new_tokens=10, min_new_tokens=10, do_sample=False,
                             pad_token_id=0)[0, len(PROMPT):].tolist()
    assert ours == ref


def test_fallback_rejects_other_precisions_and_leaves_nothing(stablelm):
    _, root, _ = stablelm
    with pytest.raises(InvalidArgumentError, match="fp32"):
        export(root / "hf", root / "pkg_int4", precision="int4", verify=False)
    assert not any(p.name.startswith((".pkg_int4", "pkg_int4")) for p in root.iterdir())
    with pytest.raises(InvalidArgumentError, match="route"):
        export(root / "hf", root / "pkg_x", route="onnx")


def test_forced_fallback_matches_direct_export(tiny_llama, tmp_path):
    forced = export(tiny_llama.source, tmp_path / "fallback", route="fallback", verify=False)
    direct_m, forced_m = mf.Manifest.load(tiny_llama.package), mf.Manifest.load(forced)
    assert forced_m.model.architecture == "fallback:llama"
    dv, fv = direct_m.variant("portable"), forced_m.variant("portable")
    assert [t.name for t in fv.inputs] == [t.name for t in dv.inputs]
    assert [t.shape for t in fv.outputs] == [t.shape for t in dv.outputs]
    direct = OnnxDecoder(tiny_llama.package / dv.file, dv)
    fallback = OnnxDecoder(forced / fv.file, fv)
    rng = np.random.default_rng(SEED)
    ids = rng.integers(0, direct_m.model.vocab_size, (2, 9), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[1, :2] = 0
    a, past_a = direct.run(ids, mask, direct.empty_past(2))
    b, past_b = fallback.run(ids, mask, fallback.empty_past(2))
    real = mask.astype(bool)
    assert np.abs(a[real] - b[real]).max() <= 1e-4 * np.abs(a[real]).max()
    step = rng.integers(0, direct_m.model.vocab_size, (2, 1), dtype=np.int64)
    mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
    a, _ = direct.run(step, mask, past_a)
    b, _ = fallback.run(step, mask, past_b)
    assert np.abs(a - b).max() <= 1e-4 * np.abs(a).max()
