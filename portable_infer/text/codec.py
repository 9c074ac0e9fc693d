"""``TextCodec``: one package's tokens <-> text (its tokenizer, chat template and special tokens).

    encode / decode        text <-> token ids, through the package's ``tokenizer.json``
    as_ids                 a prompt given as text (encoded) or as token ids (checked) -> ids
    chat_ids               messages (and tools) -> the chat template's prompt, encoded
    eos_ids, pad_id        the ids a generation ends on, and the one left padding uses
    text_stream            one sequence's token ids -> safe text pieces, holding back stop strings
    require_tokenizer      the tokenizer, or PackageError: this package takes token ids only

``load()`` builds it from the package's files (:meth:`TextCodec.from_package`); ``Model.codec``,
the scheduler and the server use that one. The engine never sees text: everything here is on the
host, before the first forward or after each token.

Example::

    codec = model.codec
    ids = codec.chat_ids([{"role": "user", "content": "Hi"}])
    codec.decode(ids)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from portable_infer.errors import PackageError
from portable_infer.package.manifest import Manifest
from portable_infer.text.chat_template import ChatTemplate
from portable_infer.text.prompts import check_messages, check_text, token_ids
from portable_infer.text.streaming import TextStream
from portable_infer.text.tool_specs import template_messages


@dataclass(frozen=True)
class TextCodec:
    """Tokens <-> text for one package (see the module doc). Plain data: build it from a
    manifest (:meth:`from_manifest`) or a package directory (:meth:`from_package`).

    Args:
        vocab_size: token ids are ints in ``[0, vocab_size)``.
        eos_ids: the model's end tokens.
        pad_id: the id left padding fills in (never attended to).
        tokenizer: a ``tokenizers.Tokenizer``, or None (the package takes token ids only).
        chat_template: the package's :class:`ChatTemplate`, or None.
    """

    vocab_size: int
    eos_ids: tuple = ()
    pad_id: int = 0
    tokenizer: Any = None
    chat_template: ChatTemplate | None = None

    @classmethod
    def from_manifest(cls, manifest: Manifest, tokenizer=None, chat_template: ChatTemplate | None = None) -> TextCodec:
        """The codec of ``manifest``'s special tokens over ``tokenizer`` and ``chat_template``
        (the pad id: the manifest's, else the first end token, else 0)."""
        tok = manifest.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_ids or (0,))[0]
        return cls(manifest.model.vocab_size, tuple(tok.eos_token_ids), pad, tokenizer, chat_template)

    @classmethod
    def from_package(cls, pkg: Path, manifest: Manifest) -> TextCodec:
        """Read the tokenizer and chat template that ``manifest`` names in the package ``pkg``
        (either may be absent); PackageError when a named file cannot be read."""
        info = manifest.tokenizer
        tokenizer = template = None
        if info.file:
            from tokenizers import Tokenizer

            try:
                tokenizer = Tokenizer.from_file(str(pkg / info.file))
            except Exception as exc:  # tokenizers raises a bare Exception on a bad file
                raise PackageError(f"{pkg / info.file} could not be read ({exc}); re-export the package") from exc
        if info.chat_template_file:
            path = pkg / info.chat_template_file
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise PackageError(f"{path} could not be read as UTF-8 text ({exc}); re-export the package") from exc
            template = ChatTemplate(text, _template_tokens(tokenizer, info))
        return cls.from_manifest(manifest, tokenizer, template)

    # --- what the package has ---------------------------------------------------------------------
    def require_tokenizer(self):
        """The package's tokenizer, or PackageError when it has none (token ids only)."""
        if self.tokenizer is None:
            raise PackageError("this package has no tokenizer.json: pass token ids (generate_ids) "
                               "or re-export from a source that ships tokenizer files")
        return self.tokenizer

    @property
    def template_source(self) -> str | None:
        """The chat template's Jinja text (it names the model's tool-call format), or None."""
        return self.chat_template.source if self.chat_template is not None else None

    # --- text <-> ids -----------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list:
        """Token ids of ``text`` (valid Unicode; InvalidArgumentError names a bad character)."""
        check_text(text)
        # encode_batch releases the GIL while it runs, encode does not: a long prompt tokenized on
        # the server's thread pool would otherwise still stall its event loop (same ids either way)
        return self.require_tokenizer().encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """The text of ``ids`` (checked to be ints in the vocabulary)."""
        ids = token_ids(ids, self.vocab_size, "ids")
        return self.require_tokenizer().decode(ids, skip_special_tokens=skip_special_tokens)

    def as_ids(self, prompt, what: str = "prompt") -> list:
        """Text (encoded) or token ids (checked) -> a list of token ids; ``what`` names it in errors."""
        if isinstance(prompt, str):
            check_text(prompt, what)
            return self.encode(prompt)
        return token_ids(prompt, self.vocab_size, what)

    def chat_ids(self, messages: list, tools: list | None = None) -> list:
        """Token ids of ``messages`` rendered with the chat template (and ``tools``), ending with the
        header of the assistant's turn, as transformers' ``apply_chat_template`` renders them."""
        messages = check_messages(template_messages(messages))  # typed errors; tool calls' arguments as objects
        if self.chat_template is None:
            raise PackageError("this package has no chat template; use generate() with a plain prompt")
        text = self.chat_template.render(messages, add_generation_prompt=True, tools=tools)
        return self.encode(text, add_special_tokens=False)

    def text_stream(self, params=None) -> TextStream:
        """A :class:`TextStream` for one sequence sampled with ``params``: its tokens as text, its
        stop strings held back, the token that ends it silent where it is one of
        ``params.silent_end_ids`` (without a tokenizer every piece is empty)."""
        if params is None:
            return TextStream(self.tokenizer)
        return TextStream(self.tokenizer, params.stop, params.silent_end_ids(self.eos_ids))


def _template_tokens(tokenizer, info) -> dict:
    """``bos_token`` / ``eos_token`` as the chat template reads them: the tokens of the manifest's
    ids (an id the tokenizer does not have is left out)."""
    specials = {}
    if tokenizer is None:
        return specials
    for key, tid in (("bos_token", info.bos_token_id), ("eos_token", (info.eos_token_ids or (None,))[0])):
        token = tokenizer.id_to_token(tid) if tid is not None else None
        if token is not None:
            specials[key] = token
    return specials
