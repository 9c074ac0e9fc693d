"""Build a Hugging Face ``tokenizers`` tokenizer from the metadata of a GGUF file.

transformers' own GGUF conversion gets SmolLM2 wrong (it prepends a BOS to every encode, calls
token 1 the EOS and drops the digit-splitting pre-tokenizer), so we rebuild the tokenizer the way
llama.cpp runs it (src/llama-vocab.cpp): a GPT-2 style byte-level BPE whose pre-tokenizer is a
list of regex splits chosen by ``tokenizer.ggml.pre``, with control and user-defined tokens
matched whole in the input text (llama.cpp's ``parse_special=True``).

Input is the plain dict from :func:`exporters.gguf_meta.read_gguf_metadata`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from portable_infer.errors import SourceError

logger = logging.getLogger(__name__)

SUPPORTED_MODELS = ("gpt2",)

# GGUF token_type values (gguf-py TokenType / llama.cpp LLAMA_TOKEN_TYPE_*).
_CONTROL = 3
_USER_DEFINED = 4

# The regexes, copied from llama.cpp's llm_tokenizer_bpe (llama-vocab.cpp). llama.cpp applies them
# one after the other, each splitting the pieces of the previous one and keeping unmatched text as
# pieces of its own: exactly a Sequence of Split(..., "isolated") pre-tokenizers.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class PreTokenizerSpec:
    """How llama.cpp pre-tokenizes one ``tokenizer.ggml.pre`` family.

    Attributes:
        splits: regexes applied in order (see the note above ``_GPT2``).
        ignore_merges: a word that is already a vocab entry is one token, merges or not.
        add_bos: llama.cpp's default when the GGUF has no ``tokenizer.ggml.add_bos_token``.
    """

    splits: tuple[str, ...]
    ignore_merges: bool = False
    add_bos: bool = False


# llama.cpp's pre types, each with the tokenizer.ggml.pre names (aliases) that select it there.
# A GGUF without tokenizer.ggml.pre gets "default", as in llama.cpp.
_FAMILIES: tuple[tuple[PreTokenizerSpec, tuple[str, ...]], ...] = (
    (PreTokenizerSpec((r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]")), ("default",)),
    (PreTokenizerSpec((_GPT2,)), ("gpt-2", "phi-2", "mpt", "olmo")),
    (PreTokenizerSpec((r"\p{N}", _GPT2)), ("smollm", "starcoder", "refact", "command-r", "codeshell")),
    (PreTokenizerSpec((_LLAMA3,), ignore_merges=True, add_bos=True), ("llama-bpe", "llama3", "llama-v3")),
    (PreTokenizerSpec((_LLAMA3,)), ("dbrx", "smaug-bpe")),
    (PreTokenizerSpec((_QWEN2,)), ("qwen2", "deepseek-r1-qwen", "stablelm2")),
)
PRE_TOKENIZERS: dict[str, PreTokenizerSpec] = {name: spec for spec, names in _FAMILIES for name in names}


def build_tokenizer(meta: dict[str, Any]) -> Tokenizer:
    """Build the tokenizer that encodes text the way llama.cpp does for this GGUF.

    Args:
        meta: GGUF metadata as returned by :func:`exporters.gguf_meta.read_gguf_metadata`.

    Returns:
        A byte-level BPE ``tokenizers.Tokenizer``. Control (type 3) and user-defined (type 4) tokens
        are added tokens, so ``"<|im_start|>"`` in the text encodes as its single id. BOS (and EOS)
        are added by the post-processor only when the GGUF asks for them.

    Raises:
        SourceError: an unsupported ``tokenizer.ggml.model`` or ``tokenizer.ggml.pre``, or
            tokenizer keys that are missing or inconsistent.

    Example:
        >>> tok = build_tokenizer(read_gguf_metadata(path))  # doctest: +SKIP
        >>> tok.encode("<|im_start|>user", add_special_tokens=False).ids  # doctest: +SKIP
        [1, 4093]
    """
    _check_model(meta)
    spec = _pre_tokenizer_spec(meta)
    tokens: list[str] = _required(meta, "tokenizer.ggml.tokens")
    vocab = {text: i for i, text in enumerate(tokens)}
    if len(vocab) != len(tokens):
        # llama.cpp's token_to_id map keeps the last id too.
        logger.warning("GGUF vocab has %d duplicate token strings; the last id wins", len(tokens) - len(vocab))
    merges = [_split_merge(m) for m in _required(meta, "tokenizer.ggml.merges")]

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=spec.ignore_merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(rx), behavior="isolated") for rx in spec.splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()

    tok.add_tokens(_added_tokens(tokens, meta.get("tokenizer.ggml.token_type") or []))
    tok.post_processor = _template(meta, tokenizer_info(meta))
    logger.debug(
        "built gpt2/%s tokenizer: %d tokens, %d merges",
        meta.get("tokenizer.ggml.pre"), len(tokens), len(merges),
    )
    return tok


def tokenizer_info(meta: dict[str, Any]) -> dict[str, Any]:
    """Summarise the special ids and chat template of a GGUF tokenizer.

    Returns:
        ``{"bos_token_id", "eos_token_ids", "pad_token_id", "add_bos", "chat_template",
        "special_tokens": {"bos_token", "eos_token", "pad_token", "unk_token"}}``.
        ``eos_token_ids`` holds the EOS id and, when present, the end-of-turn / end-of-message ids
        (generation stops on any of them).

    Raises:
        SourceError: an id points outside the vocabulary, or an unsupported tokenizer.
    """
    _check_model(meta)
    tokens: list[str] = _required(meta, "tokenizer.ggml.tokens")

    def token_id(key: str) -> int | None:
        value = meta.get(f"tokenizer.ggml.{key}")
        if value is not None and not 0 <= value < len(tokens):
            raise SourceError(
                f"tokenizer.ggml.{key} must be in [0, {len(tokens)}), got {value}; the GGUF is inconsistent"
            )
        return value

    bos, eos = token_id("bos_token_id"), token_id("eos_token_id")
    pad, unk = token_id("padding_token_id"), token_id("unknown_token_id")
    eos_ids = [i for i in (eos, token_id("eot_token_id"), token_id("eom_token_id")) if i is not None]
    add_bos = meta.get("tokenizer.ggml.add_bos_token", _pre_tokenizer_spec(meta).add_bos)

    def text(i: int | None) -> str | None:
        return None if i is None else tokens[i]

    return {
        "bos_token_id": bos,
        "eos_token_ids": list(dict.fromkeys(eos_ids)),
        "pad_token_id": pad,
        "add_bos": bool(add_bos),
        "chat_template": meta.get("tokenizer.chat_template"),
        "special_tokens": {
            "bos_token": text(bos),
            "eos_token": text(eos),
            "pad_token": text(pad),
            "unk_token": text(unk),
        },
    }


def tokenizer_config(info: dict[str, Any]) -> dict[str, Any]:
    """Return an HF ``tokenizer_config.json`` dict for ``info`` (from :func:`tokenizer_info`).

    The chat template is left out (it ships as its own file) and so is ``model_max_length``.
    ``clean_up_tokenization_spaces`` is off: byte-level BPE decodes losslessly as it is.
    """
    special = info["special_tokens"]
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": special["bos_token"],
        "eos_token": special["eos_token"],
        "pad_token": special["pad_token"],
        "add_bos_token": info["add_bos"],
        "clean_up_tokenization_spaces": False,
    }
    if special.get("unk_token") is not None:
        config["unk_token"] = special["unk_token"]
    return config


# --- helpers -------------------------------------------------------------------------------------
def _check_model(meta: dict[str, Any]) -> None:
    model = meta.get("tokenizer.ggml.model")
    if model not in SUPPORTED_MODELS:
        raise SourceError(
            f"tokenizer.ggml.model {model!r} is not supported; supported: {', '.join(SUPPORTED_MODELS)} "
            "(byte-level BPE). Export from the Hugging Face folder instead of the GGUF file."
        )


def _pre_tokenizer_spec(meta: dict[str, Any]) -> PreTokenizerSpec:
    name = meta.get("tokenizer.ggml.pre") or "default"
    try:
        return PRE_TOKENIZERS[name]
    except KeyError:
        raise SourceError(
            f"tokenizer.ggml.pre {name!r} is not supported; supported: "
            f"{', '.join(sorted(PRE_TOKENIZERS))}. Add its regexes (llama.cpp's llama-vocab.cpp) "
            "to PRE_TOKENIZERS in exporters/gguf_tokenizer.py."
        ) from None


def _required(meta: dict[str, Any], key: str) -> Any:
    if key not in meta:
        raise SourceError(f"GGUF metadata has no {key!r}; the file has no usable tokenizer")
    return meta[key]


def _added_tokens(tokens: list[str], types: list[int]) -> list[AddedToken]:
    """Control and user-defined tokens, matched whole in raw text like llama.cpp's parse_special.

    Control tokens are special (dropped by ``decode(skip_special_tokens=True)``); user-defined ones
    (e.g. ``<tool_call>``, HF's non-special added tokens) stay ordinary text when decoded.
    """
    if types and len(types) != len(tokens):
        raise SourceError(
            f"tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens; "
            "the GGUF is inconsistent"
        )
    return [
        AddedToken(tokens[i], special=(kind == _CONTROL), normalized=False)
        for i, kind in enumerate(types)
        if kind in (_CONTROL, _USER_DEFINED) and tokens[i]
    ]


def _split_merge(merge: str) -> tuple[str, str]:
    # Like llama.cpp, search from index 1 so that a left part starting with a space survives.
    pos = merge.find(" ", 1)
    if pos < 0:
        raise SourceError(
            f"tokenizer.ggml.merges entry {merge!r} is not 'left right'; the GGUF is corrupt"
        )
    return merge[:pos], merge[pos + 1 :]


def _template(meta: dict[str, Any], info: dict[str, Any]) -> processors.TemplateProcessing | None:
    """Post-processor adding BOS (and EOS) around each sequence when the GGUF asks for it."""
    special = info["special_tokens"]
    bos = [(special["bos_token"], info["bos_token_id"])] if info["add_bos"] else []
    eos_id = meta.get("tokenizer.ggml.eos_token_id")
    eos = [(special["eos_token"], eos_id)] if meta.get("tokenizer.ggml.add_eos_token") else []
    if not bos and not eos:
        return None
    if any(i is None for _, i in bos + eos):
        raise SourceError("the GGUF asks to add a BOS/EOS token but has no bos/eos_token_id")
    first = [t for t, _ in bos] + ["$A"] + [t for t, _ in eos]
    second = [t for t, _ in bos] + ["$B:1"] + [t for t, _ in eos]
    return processors.TemplateProcessing(
        single=first, pair=first + second, special_tokens=list(dict.fromkeys(bos + eos))
    )
