"""Constrained decoding: JSON schema, any JSON object, regex and Lark grammars, with llguidance.

::

    Constraint            what the request asked for (plain, hashable data; no llguidance)
      └ Guide             one per model: llguidance's tokenizer built from tokenizer.json, and the
          │               compiled grammars (a bad schema or grammar is an InvalidArgumentError)
          └ matcher()     a fresh per-sequence matcher: its mask says which tokens may come next
    MaskFill              the masks of every constrained row of a step in one llguidance call,
                          on a worker thread so that it runs while the forward pass does

The mask is one of the logit processors of the per-token rule (:mod:`portable_infer.decode.sequence`);
the sampled token is fed to the matcher with the next step's fill, and the sequence stops ("stop")
on the end token once the grammar is complete. llguidance is imported on first use only.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from portable_infer.errors import DependencyError, GenerationError, InvalidArgumentError

logger = logging.getLogger(__name__)

KINDS = ("json_schema", "json_object", "regex", "grammar")
# JSON written the way people write it ({"a": 1, "b": 2}), with no other whitespace: free
# whitespace lets a small model loop on newlines until max_new_tokens. A schema's own
# "x-guidance" options override these (llguidance applies defaults -> x-guidance -> overrides).
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_COMPILED_CACHE = 64  # compiled grammars kept per model (requests often repeat one schema)
# llguidance's own pool for a step's masks. Its default (80 % of the CPUs: 12 on a 16-core GPU
# host) filled 16 JSON-schema rows in 0.46-0.60 ms, 2 threads in 0.30-0.34 ms, and the CUDA step's
# overhead fell from +8-12 % to +5-8 % (H200, docs/benchmarks.md, session 17): waking many
# threads costs more than it saves at these sizes. Never more than its default (1 on 2 CPUs,
# where ONNX Runtime's threads compute the forward meanwhile).
MASK_THREADS = 2


def _mask_threads() -> int:
    return max(1, min(MASK_THREADS, int(0.8 * len(os.sched_getaffinity(0)))))


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


_executor_lock = threading.Lock()
_executors: dict = {}


class _Worker:
    """One daemon thread running the calls submitted to it in order; each call's outcome comes
    back through its own queue. Lighter than a ThreadPoolExecutor's futures: every constrained
    step submits one, on the step's own path."""

    def __init__(self, name: str):
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def _run(self) -> None:
        while True:
            fn, args, reply = self._tasks.get()
            try:
                reply.put((True, fn(*args)))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller, raised there
                reply.put((False, exc))

    def submit(self, fn, *args) -> queue.SimpleQueue:
        """Run ``fn(*args)`` on the thread; its (ok, value or exception) arrives on the queue returned."""
        reply: queue.SimpleQueue = queue.SimpleQueue()
        self._tasks.put((fn, args, reply))
        return reply


def _shared(kind: str):
    """One llguidance executor (its own thread pool) and one worker thread per process, made on
    first use."""
    with _executor_lock:
        if kind not in _executors:
            _executors[kind] = (_llguidance().LLExecutor(num_threads=_mask_threads()) if kind == "llg"
                                else _Worker("portable-infer-masks"))
        return _executors[kind]


def fill_masks(matchers: dict, rows: int, vocab_size: int) -> np.ndarray:
    """Token bitmasks [rows, ceil(vocab/32)] int32 for ``matchers`` ({row: matcher}) in one
    batched llguidance call (rows without a matcher keep every token allowed)."""
    import llguidance.numpy as lln

    mask = lln.allocate_token_bitmask(rows, vocab_size)
    if matchers:
        lln.fill_next_token_bitmask_par(_shared("llg"), [(m, i) for i, m in matchers.items()], mask)
    return mask


class MaskFill:
    """:func:`fill_masks` for one step, made before the forward pass and taken (:meth:`result`)
    after it: started on a worker thread (llguidance releases the GIL, and so does ONNX Runtime's
    run), or, ``inline``, run by :meth:`run` on the caller's thread while the device computes the
    forward (an engine that ``overlaps_host``: no thread hand-offs on the step's path). ``fed``:
    sequences whose last token goes to their matcher first (:meth:`Sequence.feed
    <portable_infer.decode.sequence.Sequence.feed>`), in the same call: off the step's path too.

    The matchers must not be touched until :meth:`result` returns.
    """

    def __init__(self, matchers: dict, rows: int, vocab_size: int, fed=(), inline: bool = False):
        self._args = (fed, matchers, rows, vocab_size) if matchers else None
        self._reply = _shared("thread").submit(_feed_and_fill, *self._args) if matchers and not inline else None
        self._masks = None

    @classmethod
    def of(cls, seqs: list, inline: bool = False) -> MaskFill:
        """The fill for a batch's rows: ``seqs`` their :class:`~portable_infer.decode.sequence.Sequence`
        (None for a row that picks nothing this step); one bitmask row per entry."""
        matchers, fed, vocab = {}, [], 0
        for i, s in enumerate(seqs):
            if s is not None and s.matcher is not None:
                matchers[i] = s.matcher
                fed.append(s)
                vocab = max(vocab, s.mask_vocab)
        return cls(matchers, len(seqs), vocab, fed, inline)

    def run(self) -> None:
        """An inline fill: fill now, on this thread (once; nothing for a started one). A failure
        is kept for :meth:`result`: the forward this runs inside completes."""
        if self._args is not None and self._reply is None and self._masks is None:
            try:
                self._masks = _feed_and_fill(*self._args)
            except BaseException as exc:  # noqa: BLE001 - raised by result()
                self._masks = exc

    def result(self) -> np.ndarray | None:
        """The bitmasks (None when no row was constrained)."""
        if self._reply is not None and self._masks is None:
            self._masks = self._reply.get()[1]
        self.run()
        if isinstance(self._masks, BaseException):
            raise self._masks
        return self._masks


def _feed_and_fill(fed, matchers: dict, rows: int, vocab_size: int) -> np.ndarray:
    """Feed each of ``fed`` its last token, then :func:`fill_masks` (a matcher that refused its
    token keeps every token allowed: its row raises at its step)."""
    for seq in fed:
        seq.feed()
    return fill_masks({i: m for i, m in matchers.items() if not m.is_error()}, rows, vocab_size)


def allows(mask: np.ndarray, token: int) -> bool:
    """Bitmask row ``mask`` ([W] int32) lets ``token`` come next (bit token % 32 of word token // 32)."""
    return bool((int(mask[token >> 5]) >> (token & 31)) & 1)


def allows_each(masks: np.ndarray, rows, tokens) -> np.ndarray:
    """:func:`allows` for several rows at once: row ``rows[k]`` of the bitmask ``masks`` [B, W]
    int32 lets ``tokens[k]`` come next -> bool [len(rows)] (reads one word a row, copies no mask)."""
    rows, tokens = np.asarray(rows, np.int64), np.asarray(tokens, np.int64)
    words = masks[rows, tokens >> 5].astype(np.int64)
    return ((words >> (tokens & 31)) & 1).astype(bool)


def forced_tokens(masks: np.ndarray) -> np.ndarray:
    """For bitmask rows ``masks`` [n, W] int32: the one token each allows, or -1 where it allows
    more (or none). A token the grammar forces needs no logits: it is the argmax under the mask."""
    masks = np.ascontiguousarray(masks)
    nonzero = masks != 0
    word = nonzero.argmax(axis=1)
    w = masks[np.arange(len(masks)), word].view(np.uint32).astype(np.int64)
    single = (nonzero.sum(axis=1) == 1) & ((w & (w - 1)) == 0)
    bit = np.zeros(len(masks), np.int64)
    for k in np.flatnonzero(single):  # the few forced rows: their one bit
        bit[k] = int(w[k]).bit_length() - 1
    return np.where(single, word * 32 + bit, -1)


def allowed_tokens(mask: np.ndarray, vocab_size: int) -> np.ndarray:
    """Bitmask rows ([W] or [n, W] int32) as bools ([vocab] or [n, vocab]): True where the token
    may come next (bit v % 32 of word v // 32); a batch's rows in one call."""
    bits = np.unpackbits(np.ascontiguousarray(mask).view(np.uint8), axis=-1, count=vocab_size, bitorder="little")
    return bits.view(np.bool_)
