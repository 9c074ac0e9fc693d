"""Helpers for the serving tests: the tiny llama package with a tokenizer and a chat template,
and engine wrappers that record, pace or slow a decode loop.

The tiny package of conftest.py has no tokenizer; the server speaks text. This copies it and adds
a character-level ``tokenizers`` BPE (no merges, 256 ids: 4 specials and 252 characters, so every
id the model can emit decodes) and a one-line chat template, then rewrites the manifest's
tokenizer entry and file list so the package still verifies.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")  # ids 0..3 = the tiny config's pad, bos, eos
CHARS = [chr(c) for c in (*range(32, 127), *range(161, 256), *range(0x100, 0x13E))]
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


def char_tokenizer():
    from tokenizers import Tokenizer, decoders, models

    vocab = {t: i for i, t in enumerate(SPECIALS)}
    vocab.update({c: len(SPECIALS) + i for i, c in enumerate(CHARS)})
    assert len(vocab) == 256
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(SPECIALS))
    return tok


def add_tokenizer(package: Path, out: Path, tokenizer=None, template: str = CHAT_TEMPLATE) -> Path:
    """A copy of ``package`` at ``out`` with tokenizer.json (default: :func:`char_tokenizer`) and
    chat_template.jinja."""
    from portable_infer.package import manifest as mf

    shutil.copytree(package, out)
    (tokenizer or char_tokenizer()).save(str(out / "tokenizer.json"))
    (out / "chat_template.jinja").write_text(template, encoding="utf-8")
    m = mf.Manifest.load(out)
    tok = mf.TokenizerInfo(file="tokenizer.json", config_file=None, chat_template_file="chat_template.jinja",
                           bos_token_id=1, eos_token_ids=(2,), pad_token_id=0, add_bos=False)
    dataclasses.replace(m, tokenizer=tok, files=mf.file_entries(out)).save(out)
    return out


class EngineSpy:
    """Stands in for an engine: ``before(ids, mask, cache, ...)`` runs before every forward (to
    record, pace or slow the caller's decode loop)."""

    def __init__(self, engine, before):
        self.engine, self.before = engine, before

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def forward(self, ids, *args, **kwargs):
        self.before(ids, *args)
        return self.engine.forward(ids, *args, **kwargs)


def SlowEngine(engine, delay_s: float) -> EngineSpy:  # noqa: N802 - reads as the engine it makes
    """An engine that sleeps ``delay_s`` per forward, so streams last long enough to interrupt."""
    import time

    return EngineSpy(engine, lambda *_: time.sleep(delay_s))


def with_engine(model, engine):
    from portable_infer.model import Model

    return Model(model.manifest, engine, model.codec, model.path, model.selection)


class OnGpu:
    """A model whose engine says it runs on CUDA (its device and variant only): the scheduler's
    device-dependent defaults, without a GPU. Everything else is the model's."""

    def __init__(self, model):
        self._model = model
        self.engine = type("E", (), {"device": "cuda", "variant": model.engine.variant})()

    def __getattr__(self, name):
        return getattr(self._model, name)
