"""Shared fixtures: tiny random llama packages exported once per session (fp32, no tokenizer)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

def pytest_configure(config):
    """Variant choice by the rules in every test (subprocesses too): measuring on the host would make
    which variant runs depend on the machine. tests/test_tune*.py turn measuring on where they test it."""
    os.environ["PORTABLE_INFER_TUNE"] = "0"


TINY_LLAMA = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, num_hidden_layers=2, max_position_embeddings=256,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
TINY_WEIGHT_SEED = 1234  # fixed weights; the prompts of each test come from a fresh rng


@dataclass(frozen=True)
class TinyLlama:
    model: object  # the transformers LlamaForCausalLM the package was exported from
    source: Path  # its save_pretrained folder (no tokenizer files)
    package: Path  # the fp32 package, full context
    short_package: Path  # the same weights exported with max_context=16


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> TinyLlama:
    """A tiny random llama (GQA, 2 layers, vocab 256) and its fp32 packages, without tokenizer."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from exporters.export import export

    root = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(TINY_WEIGHT_SEED)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_LLAMA)).eval()
    # transformers' init (std 0.02, norms at 1) gives nearly flat logits where greedy ties are
    # common; larger random weights give a clear argmax, so greedy parity is a sharp test.
    gen = torch.Generator().manual_seed(TINY_WEIGHT_SEED)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.add_(0.2 * noise) if p.ndim == 1 else p.copy_(0.08 * noise)
    model.save_pretrained(root / "hf")
    package = export(root / "hf", root / "pkg", precision="fp32", verify=False)
    short = export(root / "hf", root / "pkg16", precision="fp32", max_context=16, verify=False)
    return TinyLlama(model, root / "hf", package, short)


@pytest.fixture(scope="session")
def load_variant():
    """``load_variant(package, name)``: a Model on one graph variant of a package, on CPU.

    ``load()`` runs the variant the provider prefers (the fused one on CPU when the package has
    it); invariants and parity should hold for every variant. Skips when the package lacks it.
    """
    def load(package, name: str, threads: int = 2):
        import onnxruntime as ort

        import portable_infer
        from portable_infer.model import Model
        from portable_infer.engine.providers import select_session
        from portable_infer.engine.growing import GrowingEngine
        from portable_infer.engine.session import SessionConfig

        base = portable_infer.load(package, "cpu", intra_op_threads=threads)  # checks files, reads tokenizer
        if base.variant == name:
            return base
        if name not in [v.name for v in base.manifest.variants]:
            pytest.skip(f"{package} has no {name} variant")
        sel = select_session([base.manifest.variant(name)], package, "cpu",
                             session_options=SessionConfig(intra_op_threads=threads).session_options(ort))
        engine = GrowingEngine(sel.session, sel.variant, sel.provider.ort_name, ort, max_context=base.max_context)
        return Model(base.manifest, engine, base.codec, base.path, sel)
    return load


@pytest.fixture(scope="session")
def tiny_text_package(tiny_llama, tmp_path_factory) -> Path:
    """tiny_llama's fp32 package plus a byte-level tokenizer (256 tokens = its vocab): text in, text out."""
    import dataclasses
    import shutil

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from portable_infer.package import manifest as mf

    out = tmp_path_factory.mktemp("tiny_text") / "pkg"
    shutil.copytree(tiny_llama.package, out)
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(out / "tokenizer.json"))
    m = mf.Manifest.load(out)
    info = dataclasses.replace(m.tokenizer, file="tokenizer.json", config_file=None)
    dataclasses.replace(m, tokenizer=info, files=mf.file_entries(out)).save(out)
    return out
