"""Constrained decoding: JSON schema, any JSON object, regex and Lark grammars, with llguidance.

::

    Constraint            what the request asked for (plain, hashable data; no llguidance)
      └ Guide             one per model: llguidance's tokenizer built from tokenizer.json, and the
          │               compiled grammars (a bad schema or grammar is an InvalidArgumentError)
          └ matcher()     a fresh per-sequence matcher: its mask says which tokens may come next
    (masks.py             a step's masks: MaskFill, and reading llguidance's bitmasks)

The mask is one of the logit processors of the per-token rule (:mod:`portable_infer.decode.sequence`);
the sampled token is fed to the matcher with the next step's fill, and the sequence stops ("stop")
on the end token once the grammar is complete. llguidance is imported on first use only.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

from portable_infer.errors import DependencyError, GenerationError, InvalidArgumentError

logger = logging.getLogger(__name__)

KINDS = ("json_schema", "json_object", "regex", "grammar")
# JSON written the way people write it ({"a": 1, "b": 2}), with no other whitespace: free
# whitespace lets a small model loop on newlines until max_new_tokens. A schema's own
# "x-guidance" options override these (llguidance applies defaults -> x-guidance -> overrides).
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_COMPILED_CACHE = 64  # compiled grammars kept per model (requests often repeat one schema)
def _llguidance():
    try:
        import llguidance
        import llguidance.numpy  # noqa: F401 - the batched mask fill
    except ImportError as exc:
        raise DependencyError("constrained decoding (response_format, constraint=) needs llguidance; "
                              "install it with: pip install llguidance") from exc
    return llguidance


@dataclass(frozen=True)
class Constraint:
    """A constraint on the generated text; build it with the class methods.

    ``kind`` is one of :data:`KINDS`; ``source`` the JSON schema (as JSON text), the regex or the
    Lark grammar. ``param`` is the request argument errors name (``"constraint"``, or
    ``"response_format"`` when it came from one). Example: ``Constraint.regex(r"[0-9]{3}")``.
    """

    kind: str
    source: str = ""
    param: str = field(default="constraint", compare=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InvalidArgumentError(f"constraint kind must be one of {', '.join(KINDS)}, got {self.kind!r}",
                                       param=self.param)
        if not isinstance(self.source, str) or (self.kind != "json_object" and not self.source):
            raise InvalidArgumentError(f"a {self.kind} constraint needs a non-empty string, got {self.source!r}",
                                       param=self.param)

    @classmethod
    def json_schema(cls, schema, param: str = "constraint") -> Constraint:
        """Output that is one JSON value valid under ``schema`` (a dict, or its JSON text)."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as exc:
                raise InvalidArgumentError(f"the JSON schema is not valid JSON: {exc}", param=param) from None
        if not isinstance(schema, dict):
            raise InvalidArgumentError(f"a JSON schema must be a JSON object (a dict), got "
                                       f"{type(schema).__name__}", param=param)
        try:
            text = json.dumps(schema, allow_nan=False)  # key order kept: properties come out in it
        except (TypeError, ValueError) as exc:
            raise InvalidArgumentError(f"the JSON schema cannot be written as JSON: {exc}", param=param) from None
        return cls("json_schema", text, param)

    @classmethod
    def json_object(cls, param: str = "constraint") -> Constraint:
        """Output that is any one JSON object (OpenAI's ``{"type": "json_object"}``)."""
        return cls("json_object", "", param)

    @classmethod
    def regex(cls, pattern: str, param: str = "constraint") -> Constraint:
        """Output that matches ``pattern`` as a whole (Rust regex syntax)."""
        return cls("regex", pattern, param)

    @classmethod
    def grammar(cls, lark: str, param: str = "constraint") -> Constraint:
        """Output in the language of a Lark grammar (llguidance's dialect; ``start`` is the root)."""
        return cls("grammar", lark, param)

    @classmethod
    def from_response_format(cls, response_format) -> Constraint | None:
        """An OpenAI ``response_format`` as a constraint: ``{"type": "text"}`` is None,
        ``{"type": "json_object"}`` any object, ``{"type": "json_schema", "json_schema":
        {"name": ..., "schema": {...}, "strict": ...}}`` that schema."""
        p = "response_format"
        if not isinstance(response_format, dict) or not isinstance(response_format.get("type"), str):
            raise InvalidArgumentError(f"response_format must be an object with a string 'type' (text, "
                                       f"json_object or json_schema), got {response_format!r}", param=p)
        kind = response_format["type"]
        extra = sorted(set(response_format) - {"type", "json_schema"})
        if extra or (kind != "json_schema" and "json_schema" in response_format):
            raise InvalidArgumentError(f"response_format has unexpected field(s) "
                                       f"{', '.join(extra) or 'json_schema'} for type {kind!r}", param=p)
        if kind == "text":
            return None
        if kind == "json_object":
            return cls.json_object(p)
        if kind != "json_schema":
            raise InvalidArgumentError(f"response_format type must be text, json_object or json_schema, got "
                                       f"{kind!r}", param=p)
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            raise InvalidArgumentError("response_format json_schema must be an object with a 'schema' (and "
                                       "optionally 'name', 'description', 'strict')", param=p)
        unknown = sorted(set(spec) - {"name", "schema", "strict", "description"})
        if unknown:
            raise InvalidArgumentError(f"response_format.json_schema has unknown field(s) {', '.join(unknown)}",
                                       param=p)
        return cls.json_schema(spec["schema"], p)

    @classmethod
    def coerce(cls, value) -> Constraint | None:
        """``value`` as a constraint: a Constraint, None, or a dict with one key of ``json_schema``
        / ``regex`` / ``grammar`` (``{"regex": "[0-9]+"}``), or an OpenAI response_format dict."""
        if value is None or isinstance(value, Constraint):
            return value
        if isinstance(value, dict) and "type" in value:
            return cls.from_response_format(value)
        makers = {"json_schema": cls.json_schema, "regex": cls.regex, "grammar": cls.grammar}
        if isinstance(value, dict) and len(value) == 1 and next(iter(value)) in makers:
            key, spec = next(iter(value.items()))
            return makers[key](spec)
        raise InvalidArgumentError(f"constraint must be a Constraint, None, or a dict with one of "
                                   f"{', '.join(makers)} (e.g. {{'regex': '[0-9]+'}}), got {value!r}",
                                   param="constraint")

    def llguidance_grammar(self) -> str:
        """The grammar in llguidance's JSON format (compiled, and checked, by :class:`Guide`)."""
        matcher = _llguidance().LLMatcher
        if self.kind == "regex":
            return matcher.grammar_from_regex(self.source)
        if self.kind == "grammar":
            return matcher.grammar_from_lark(self.source)
        schema = self.source if self.kind == "json_schema" else '{"type": "object"}'
        try:
            return matcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
        except ValueError as exc:
            raise InvalidArgumentError(f"the JSON schema cannot be compiled: {exc}", param=self.param) from None

    def compile_error(self) -> str | None:
        """What llguidance finds wrong with this constraint, checked without a tokenizer (its
        message's first line and ``error:`` line, not the source it echoes), or None when it compiles."""
        try:
            error = _llguidance().LLMatcher.validate_grammar(self.llguidance_grammar())
        except (TypeError, ValueError) as exc:
            error = str(exc)
        if not error:
            return None
        head, *rest = [line.strip() for line in _first_line(error).splitlines()]
        detail = next((line[len("error:"):].strip() for line in rest if line.startswith("error:")), "")
        return f"{head} {detail}".strip()


def _first_line(message: str) -> str:
    """llguidance's error text, without the parser state dump that follows it."""
    return message.split("\n<state>")[0].replace("<non-verbose/>", "").strip() or "no message"


class Guide:
    """Compiles constraints for one model's tokenizer; thread-safe (the scheduler's submit).

    Args:
        tokenizer: the package's ``tokenizers.Tokenizer``.
        vocab_size: the model's logits width (may exceed the tokenizer's).
        eos_ids: the end tokens; the grammar allows them once it is complete.
    """

    def __init__(self, tokenizer, vocab_size: int, eos_ids=()):
        self.tokenizer, self.vocab_size, self.eos_ids = tokenizer, int(vocab_size), [int(i) for i in eos_ids]
        self._lock = threading.Lock()
        self._lltokenizer = None
        self._compiled: OrderedDict = OrderedDict()

    def _make(self, llg, source):
        """llg.LLTokenizer with every EOS id; llguidance releases before list support (1.6 takes
        one int) get the first, so a grammar still ends on the model's main EOS token."""
        eos = list(self.eos_ids) or None
        try:
            return llg.LLTokenizer(source, n_vocab=self.vocab_size, eos_token=eos)
        except TypeError:
            if not eos:
                raise
            logger.info("this llguidance takes one EOS id: grammars end on %d only", eos[0])
            return llg.LLTokenizer(source, n_vocab=self.vocab_size, eos_token=eos[0])

    @property
    def lltokenizer(self):
        """llguidance's view of the tokenizer (built once, about a second for a 50k vocabulary):
        from tokenizer.json, or, where llguidance cannot read that (a decoder it does not know),
        from each token's decoded text (:class:`_TokenBytes`)."""
        with self._lock:
            if self._lltokenizer is None:
                llg = _llguidance()
                try:
                    self._lltokenizer = self._make(llg, self.tokenizer.to_str())
                except ValueError as exc:
                    logger.info("llguidance cannot read tokenizer.json (%s); using each token's text", exc)
                    wrapper = llg.TokenizerWrapper(_TokenBytes(self.tokenizer, self.vocab_size, self.eos_ids))
                    self._lltokenizer = self._make(llg, wrapper)
            return self._lltokenizer

    def token_bytes(self, token: int) -> bytes:
        """The bytes a token stands for (a piece of a UTF-8 character for some byte-level tokens)."""
        return self.lltokenizer.decode_bytes([int(token)])

    def matcher(self, constraint: Constraint):
        """A fresh matcher for one sequence; :class:`InvalidArgumentError` (its ``param``) names
        what is wrong with a schema, regex or grammar that does not compile."""
        with self._lock:
            base = self._compiled.get(constraint)
            if base is not None:
                self._compiled.move_to_end(constraint)
                return base.deep_copy()
        llg = _llguidance()
        grammar = constraint.llguidance_grammar()
        try:
            lltokenizer = self.lltokenizer
        except Exception as exc:  # noqa: BLE001 - llguidance's own errors are plain exceptions
            raise InvalidArgumentError(f"{constraint.param}: constrained decoding is not available for this "
                                       f"package's tokenizer (llguidance cannot use it: {exc})",
                                       param=constraint.param) from exc
        base = llg.LLMatcher(lltokenizer, grammar, log_level=0,
                             limits=llg.LLParserLimits(verbose_errors=False))
        if base.is_error():
            raise InvalidArgumentError(f"the {constraint.kind.replace('_', ' ')} in {constraint.param} is invalid: "
                                       f"{_first_line(base.get_error())}; fix it or leave the constraint out",
                                       param=constraint.param)
        with self._lock:
            self._compiled[constraint] = base
            if len(self._compiled) > _COMPILED_CACHE:
                self._compiled.popitem(last=False)
        return base.deep_copy()


class _TokenBytes:
    """llguidance's generic tokenizer interface (``TokenizerWrapper``) over a ``tokenizers``
    tokenizer: each token's bytes are its decoded text (exact for character-level vocabularies)."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: list):
        self.tokenizer = tokenizer
        self.eos_token_id = eos_ids[0] if eos_ids else None
        self.bos_token_id = None
        self.special_token_ids = sorted(i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special)
        special = set(self.special_token_ids)
        n = min(vocab_size, tokenizer.get_vocab_size())
        self.tokens = [(tokenizer.id_to_token(i) if i in special else tokenizer.decode([i], skip_special_tokens=False)
                        ).encode("utf-8") for i in range(n)]

    def __call__(self, text: str) -> list:
        return self.tokenizer.encode(text, add_special_tokens=False).ids


def consume(matcher, token: int) -> None:
    """Feed the sampled ``token`` to ``matcher``; a token the grammar refuses (or a matcher
    already broken) is a :class:`GenerationError` with reason ``"grammar"``."""
    if not matcher.consume_token(int(token)):
        raise GenerationError(f"the constrained decoder refused token {token}: "
                              f"{_first_line(matcher.get_error())}", reason="grammar")
