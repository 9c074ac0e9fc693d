"""Bad export sources fail with a typed error that names the problem, and leave nothing behind.

Every failure must be a :class:`PortableInferError` subclass (never a raw numpy, onnx, torch or
JSON exception) and must leave neither OUT nor a hidden ``.OUT.partial-*`` directory.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from exporters.export import export  # noqa: E402
from portable_infer.errors import (  # noqa: E402
    ExportError, InvalidArgumentError, PortableInferError, SourceError, UnsupportedArchitectureError,
    VerificationError,
)

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, num_hidden_layers=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
            pad_token_id=0, tie_word_embeddings=False)
WEIGHTS = "model.safetensors"
DROPPED = "model.layers.1.self_attn.k_proj.weight"


def save_tiny_llama(folder: Path, **overrides) -> Path:
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**TINY, **overrides})).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def good_source(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("good") / "hf")


@pytest.fixture
def source(good_source, tmp_path) -> Path:
    """A fresh copy of the tiny llama folder, for a test to break."""
    return Path(shutil.copytree(good_source, tmp_path / "src"))


def export_fails(src, out: Path, error: type, *match: str, **kwargs) -> PortableInferError:
    """Export, expect ``error`` whose message contains every ``match``, and check nothing is left."""
    kwargs.setdefault("verify", False)
    with pytest.raises(PortableInferError) as info:
        export(src, out, precision=kwargs.pop("precision", "fp32"), **kwargs)
    exc = info.value
    assert isinstance(exc, error), f"expected {error.__name__}, got {type(exc).__name__}: {exc}"
    for m in match:
        assert m in str(exc), f"{m!r} not in the message: {exc}"
    assert not out.exists(), f"{out} was left behind"
    leftovers = list(out.parent.glob(f".{out.name}.partial-*"))
    assert not leftovers, f"temporary directories left behind: {leftovers}"
    return exc


def config_of(src: Path) -> dict:
    return json.loads((src / "config.json").read_text())


def write_config(src: Path, cfg: dict) -> None:
    (src / "config.json").write_text(json.dumps(cfg))


# --- the source folder ----------------------------------------------------------------------------
def test_missing_config_json(source, tmp_path):
    (source / "config.json").unlink()
    export_fails(source, tmp_path / "out", SourceError, "config.json", str(source))


def test_config_json_is_not_json(source, tmp_path):
    (source / "config.json").write_text('{"model_type": "llama", "hidden_size": 64,')
    export_fails(source, tmp_path / "out", SourceError, "config.json", "not valid JSON")


def test_config_json_lacks_a_required_key(source, tmp_path):
    cfg = config_of(source)
    del cfg["num_hidden_layers"]
    write_config(source, cfg)
    export_fails(source, tmp_path / "out", SourceError, "num_hidden_layers")


def test_missing_tensor(source, tmp_path):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(source / WEIGHTS))
    del tensors[DROPPED]
    save_file(tensors, str(source / WEIGHTS), metadata={"format": "pt"})
    export_fails(source, tmp_path / "out", SourceError, DROPPED, "missing")


def test_no_safetensors_at_all(source, tmp_path):
    (source / WEIGHTS).unlink()
    export_fails(source, tmp_path / "out", SourceError, "safetensors")


@pytest.mark.parametrize("verify", [False, True], ids=["no-verify", "verify"])
def test_tensor_shapes_disagree_with_config(tmp_path, verify):
    """config.json says hidden 64, the tensors are hidden 32: a SourceError naming a tensor and
    both shapes, before onnx, ONNX Runtime or transformers see the mismatch."""
    src = save_tiny_llama(tmp_path / "src", hidden_size=32, intermediate_size=64, num_attention_heads=2,
                          num_key_value_heads=2)
    write_config(src, {**config_of(src), "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4})
    exc = export_fails(src, tmp_path / "out", SourceError, "model.embed_tokens.weight", "[128, 32]", "[128, 64]",
                       "config.json", verify=verify)
    assert "hidden_size 64" in str(exc)


def test_one_projection_has_the_wrong_shape(source, tmp_path):
    from safetensors.numpy import load_file, save_file

    name = "model.layers.0.mlp.down_proj.weight"  # [64, 128] in the checkpoint
    tensors = load_file(str(source / WEIGHTS))
    tensors[name] = tensors[name][:, :96].copy()
    save_file(tensors, str(source / WEIGHTS), metadata={"format": "pt"})
    export_fails(source, tmp_path / "out", SourceError, name, "[64, 96]", "[64, 128]")


@pytest.mark.parametrize("keep", [0.5, 0.999], ids=["half", "last-byte-cut"])
def test_truncated_safetensors(source, tmp_path, keep):
    path = source / WEIGHTS
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    export_fails(source, tmp_path / "out", SourceError, "truncated", WEIGHTS)


def test_safetensors_header_is_garbage(source, tmp_path):
    (source / WEIGHTS).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00" + b"not json at all!" + b"\0" * 64)
    export_fails(source, tmp_path / "out", SourceError, WEIGHTS)


def test_unsupported_model_type_lists_supported(source, tmp_path):
    write_config(source, {**config_of(source), "model_type": "mamba"})
    exc = export_fails(source, tmp_path / "out", UnsupportedArchitectureError, "'mamba'", "supported")
    for supported in ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3_text", "gpt2"):
        assert supported in str(exc)


def test_unsupported_rope_type(source, tmp_path):
    cfg = config_of(source)
    write_config(source, {**cfg, "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}})
    export_fails(source, tmp_path / "out", UnsupportedArchitectureError, "'yarn'", "llama3")


def test_nonexistent_source(tmp_path):
    missing = tmp_path / "no_such_model"
    export_fails(missing, tmp_path / "out", SourceError, str(missing), "does not exist")


def test_missing_gguf_file(tmp_path):
    missing = tmp_path / "model.gguf"
    export_fails(missing, tmp_path / "out", SourceError, str(missing))


# --- arguments and the output directory -----------------------------------------------------------
def test_existing_out_without_overwrite_is_left_untouched(good_source, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="already exists") as info:
        export(good_source, out, precision="fp32", verify=False)
    assert "overwrite" in str(info.value)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert not list(tmp_path.glob(".out.partial-*"))


def test_overwrite_replaces_an_existing_out(good_source, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    export(good_source, out, precision="fp32", verify=False, overwrite=True)
    assert (out / "manifest.json").is_file() and not (out / "stale.txt").exists()
    assert not list(tmp_path.glob(".out.partial-*"))


@pytest.mark.parametrize("precision", ["fp8", "INT4", "q4_0", ""])
def test_bad_precision(good_source, tmp_path, precision):
    exc = export_fails(good_source, tmp_path / "out", InvalidArgumentError, "precision", repr(precision),
                       precision=precision)
    assert "fp32" in str(exc) and "int4" in str(exc)  # the allowed values


@pytest.mark.parametrize("max_context", [0, -5, 2.5])
def test_bad_max_context(good_source, tmp_path, max_context):
    export_fails(good_source, tmp_path / "out", InvalidArgumentError, "max_context", max_context=max_context)


# --- verification ---------------------------------------------------------------------------------
def test_failed_verification_writes_no_package(good_source, tmp_path, monkeypatch):
    from portable_infer.package import variants

    monkeypatch.setattr(variants, "FP32_REL_TOL", -1.0)  # every difference, even 0, fails
    export_fails(good_source, tmp_path / "out", VerificationError, "differs from the transformers reference",
                 "not written", verify=True)


def test_transformers_cannot_load_the_reference(source, tmp_path, monkeypatch):
    """A reference load failure during verification is a SourceError, not transformers' own."""
    def refuse(*args, **kwargs):
        raise OSError("simulated: weights unreadable")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    export_fails(source, tmp_path / "out", SourceError, "transformers could not load", "simulated", verify=True)


def test_interrupt_during_build_leaves_nothing(good_source, tmp_path, monkeypatch):
    """Even a KeyboardInterrupt half-way through writing cleans up the temporary directory."""
    import exporters.export

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(exporters.export, "_write_tokenizer", interrupted)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        export(good_source, out, precision="fp32", verify=False)
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))
