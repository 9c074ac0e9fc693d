"""The manifest's schema as a table (field -> type), checked before any dataclass is built.

``Manifest.from_dict`` runs :func:`validate` first, so a manifest with a wrong type anywhere (a
list where a string belongs, a dict where a number does, ``true`` for ``schema_version``) is a
:class:`ManifestError` naming the field — never a TypeError or KeyError further in. Each record
table lists the fields of one dataclass of :mod:`portable_infer.package.manifest` or
:mod:`~portable_infer.package.verification` (a test keeps them in step); ``required`` fields have
no default there. Unknown fields are refused: the manifest is the contract, and a field this
runtime does not read may be one it would need.

Schema 2 (this exporter's) types the verification report; schema 1 (exporters up to 0.3.0) is read
too: the same tables, with its verification records (``VERIFICATION_V1``: the keys its exporters
wrote, nothing else) converted by ``verification.from_schema1``. A later schema is refused with a
SchemaVersionError that says to upgrade.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from portable_infer.errors import ManifestError, SchemaVersionError, UnsafePathError
from portable_infer.package.package_paths import check_path

SCHEMA_VERSION = 2
READABLE = (1, 2)  # the schema versions this runtime reads (1: converted on reading)
MAX_DEPTH = 16  # free-form JSON (source, rope_scaling): nesting deeper than this is refused
# numpy dtype names the runtime allocates with np.dtype(...)
DTYPES = ("bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
          "float16", "float32", "float64")
RESERVED = ("manifest.json", "signature.ed25519")  # never a files[] entry: the manifest cannot pin itself
SHA256 = re.compile(r"[0-9a-f]{64}")


def _fail(where: str, problem: str):
    raise ManifestError(f"manifest.json is malformed: {where} {problem}; re-export the package", field=where)


def _kind(value) -> str:
    return "null" if value is None else type(value).__name__


# --- value specs ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Str:
    enum: tuple = ()
    nonempty: bool = False
    pattern: str = ""  # a regular expression the whole string matches

    def check(self, v, where):
        if not isinstance(v, str):
            _fail(where, f"must be a string, got {_kind(v)}")
        if self.nonempty and not v:
            _fail(where, "must not be empty")
        if self.enum and v not in self.enum:
            _fail(where, f"must be one of {list(self.enum)}, got {v!r}")
        if self.pattern and not re.fullmatch(self.pattern, v):
            _fail(where, f"must match {self.pattern!r}, got {v[:40]!r}")


@dataclass(frozen=True)
class Int:
    min: int | None = None

    def check(self, v, where):
        if type(v) is not int:  # bool is an int subclass: true is not 1 here
            _fail(where, f"must be an integer, got {_kind(v)}")
        if self.min is not None and v < self.min:
            _fail(where, f"must be >= {self.min}, got {v}")


@dataclass(frozen=True)
class Num:
    min: float | None = None
    above: bool = False  # min excluded
    max: float | None = None

    def check(self, v, where):
        if type(v) not in (int, float) or not math.isfinite(v):
            _fail(where, f"must be a finite number, got {v!r}" if type(v) is float else
                  f"must be a number, got {_kind(v)}")
        if self.min is not None and (v <= self.min if self.above else v < self.min):
            _fail(where, f"must be {'>' if self.above else '>='} {self.min}, got {v}")
        if self.max is not None and v > self.max:
            _fail(where, f"must be <= {self.max}, got {v}")


class Bool:
    def check(self, v, where):
        if type(v) is not bool:
            _fail(where, f"must be true or false, got {_kind(v)}")


class PathName:
    """A package-relative path (see :mod:`portable_infer.package.package_paths`)."""

    def check(self, v, where):
        check_path(where, v)


@dataclass(frozen=True)
class Opt:
    spec: object

    def check(self, v, where):
        if v is not None:
            self.spec.check(v, where)


@dataclass(frozen=True)
class List:
    item: object
    length: int | None = None
    min_len: int = 0

    def check(self, v, where):
        if not isinstance(v, list):
            _fail(where, f"must be a list, got {_kind(v)}")
        if self.length is not None and len(v) != self.length:
            _fail(where, f"must have {self.length} items, got {len(v)}")
        if len(v) < self.min_len:
            _fail(where, f"must have at least {self.min_len} item(s)")
        for i, x in enumerate(v):
            self.item.check(x, f"{where}[{i}]")


@dataclass(frozen=True)
class Either:
    specs: tuple

    def check(self, v, where):
        for s in self.specs:
            try:
                s.check(v, where)
                return
            except ManifestError:
                continue
        _fail(where, f"has the wrong type ({_kind(v)})")


class Json:
    """Any JSON value of bounded depth (free-form: the source record, rope scaling)."""

    def __init__(self, obj: bool = False):
        self.obj = obj

    def check(self, v, where, depth: int = 0):
        if self.obj and not isinstance(v, dict):
            _fail(where, f"must be an object, got {_kind(v)}")
        if depth > MAX_DEPTH:
            _fail(where, f"is nested deeper than {MAX_DEPTH} levels")
        if isinstance(v, dict):
            for k, x in v.items():
                Json().check(x, f"{where}.{k}", depth + 1)
        elif isinstance(v, list):
            for i, x in enumerate(v):
                Json().check(x, f"{where}[{i}]", depth + 1)
        elif isinstance(v, float) and not math.isfinite(v):
            _fail(where, f"must be finite, got {v!r}")


@dataclass(frozen=True)
class Record:
    """A JSON object with these fields, {name: (spec, required)}, and no others."""

    fields: dict

    def check(self, v, where):
        if not isinstance(v, dict):
            _fail(where, f"must be an object, got {_kind(v)}")
        for name, (spec, required) in self.fields.items():
            if name in v:
                spec.check(v[name], f"{where}.{name}" if where else name)
            elif required:
                _fail(f"{where}.{name}" if where else name, "is missing")
        extra = [k for k in v if k not in self.fields]
        if extra:
            _fail(where or "the top level", f"has unknown field(s) {extra[:5]}; this runtime reads "
                  f"{sorted(self.fields)} here")


@dataclass(frozen=True)
class MapOf:
    value: object

    def check(self, v, where):
        if not isinstance(v, dict):
            _fail(where, f"must be an object, got {_kind(v)}")
        for k, x in v.items():
            self.value.check(x, f"{where}.{k}")


def _req(spec):
    return spec, True


def _opt(spec):
    return spec, False


# --- the tables -----------------------------------------------------------------------------------
NAME = Str(nonempty=True)
TENSOR = Record({"name": _req(NAME), "dtype": _req(Str(DTYPES)), "shape": _req(List(Either((Int(0), Str()))))})
PAIR = List(NAME, length=2)
KV = Record({"layout": _req(Str(("BHSD", "blocks"))), "dtype": _req(Str(DTYPES)), "num_kv_heads": _req(Int(1)),
             "head_dim": _req(Int(1)), "growth": _req(Str(("concat", "static", "paged"))), "past": _req(List(PAIR)),
             "present": _req(List(PAIR))})
VARIANT = Record({
    "name": _req(NAME), "file": _req(PathName()), "precision": _req(NAME), "opset": _req(Int(1)),
    "domains": _req(List(Str())), "providers": _req(List(NAME)), "inputs": _req(List(TENSOR)),
    "outputs": _req(List(TENSOR)), "kv": _req(KV), "logits": _opt(Str(("all", "last"))),
    "attention": _opt(Str(("masked", "gqa"))), "weight_block": _opt(Int(1)),
    "weight_symmetric": _opt(Bool()),
})
MODEL = Record({
    "architecture": _req(NAME), "model_type": _req(Str()), "num_layers": _req(Int(1)), "num_heads": _req(Int(1)),
    "num_kv_heads": _req(Int(1)), "head_dim": _req(Int(1)), "hidden_size": _req(Int(1)),
    "intermediate_size": _req(Int(1)), "vocab_size": _req(Int(1)), "max_context": _req(Int(1)),
    "rope_theta": _opt(Opt(Num(0, above=True))), "rope_scaling": _opt(Opt(Json(obj=True))),
    "sliding_window": _opt(Opt(Int(1))), "layer_types": _opt(List(Str())), "tie_word_embeddings": _opt(Bool()),
})
TOKENIZER = Record({
    "file": _opt(Opt(PathName())), "config_file": _opt(Opt(PathName())), "chat_template_file": _opt(Opt(PathName())),
    "bos_token_id": _opt(Opt(Int(0))), "eos_token_ids": _opt(List(Int(0))), "pad_token_id": _opt(Opt(Int(0))),
    "add_bos": _opt(Bool()),
})
GENERATION = Record({
    "max_new_tokens": _opt(Int(1)), "temperature": _opt(Num(0)), "top_k": _opt(Int(0)),
    "top_p": _opt(Num(0, above=True, max=1)), "repetition_penalty": _opt(Num(0, above=True)),
})
FILE = Record({"path": _req(PathName()), "sha256": _req(Str()), "size": _req(Int(0))})
# The verification report (verification.py), schema 2: every record closed and typed.
DIFF = Record({"max_abs": _req(Num(0)), "max_rel": _req(Num(0))})
GREEDY = Record({"steps": _req(Int(0)), "identical_prefix": _req(Int(0))})
CONSISTENCY = Record({"cached": _req(DIFF), "padded": _req(DIFF)})
QUALITY = Record({"agreed": _req(Int(0)), "steps": _req(Int(1)), "perplexity": _opt(Num(0, above=True)),
                  "perplexity_reference": _opt(Num(0, above=True))})
WEIGHT_FIT = Record({
    "form": _req(Str()), "lm_head": _req(Str()), "weights": _req(Int(0)), "weights_8bit": _req(Int(0)),
    "mean_abs_rel": _req(Num(0)), "mean_shift_rel": _req(Num(0)), "max_abs": _req(Num(0)), "max_steps": _req(Num(0)),
})
_REPORT = {"reference": _opt(Str()), "full": _opt(DIFF), "cached": _opt(DIFF), "greedy": _opt(GREEDY),
           "consistency": _opt(CONSISTENCY), "reference_logits": _opt(DIFF), "weight_fit": _opt(WEIGHT_FIT),
           "dropped": _opt(Str())}
REPORT = Record({**_REPORT, "quality": _opt(QUALITY), "agreement": _opt(QUALITY)})
# Schema 1: the same records, but agreement as a ratio, an "agreed/steps" string and the derived
# perplexity delta (verification.from_schema1 keeps the measurements, recomputes the rest).
QUALITY_V1 = Record({
    "top1_agreement": _req(Num(0, max=1)), "top1_agree_steps": _req(Str(pattern=r"[0-9]{1,9}/[1-9][0-9]{0,8}")),
    "perplexity": _opt(Num(0, above=True)), "perplexity_reference": _opt(Num(0, above=True)),
    "perplexity_delta": _opt(Num()),
})
REPORT_V1 = Record({**_REPORT, "quality": _opt(QUALITY_V1), "agreement": _opt(QUALITY_V1)})
MANIFEST = Record({
    "schema_version": _req(Int()), "exporter_version": _req(Str()), "source": _req(Json(obj=True)),
    "model": _req(MODEL), "precision": _req(NAME), "variants": _req(List(VARIANT, min_len=1)),
    "tokenizer": _req(TOKENIZER), "generation": _req(GENERATION), "files": _req(List(FILE)),
    "verification": _opt(MapOf(REPORT)),
})
MANIFEST_V1 = Record({**MANIFEST.fields, "verification": _opt(MapOf(REPORT_V1))})
TABLES = {"Manifest": MANIFEST, "ModelDims": MODEL, "GraphVariant": VARIANT, "KVLayout": KV, "TensorSpec": TENSOR,
          "TokenizerInfo": TOKENIZER, "GenerationDefaults": GENERATION, "FileEntry": FILE,
          "VariantReport": REPORT, "LogitDiff": DIFF, "GreedyPrefix": GREEDY, "Consistency": CONSISTENCY,
          "Quality": QUALITY, "WeightFit": WEIGHT_FIT}


def check_schema_version(d: dict) -> None:
    version = d.get("schema_version")
    if type(version) is int and version > SCHEMA_VERSION:
        raise SchemaVersionError(
            f"manifest schema_version is {version}, newer than this portable_infer reads (versions "
            f"{READABLE[0]} to {SCHEMA_VERSION}): the package was written by a later exporter; upgrade "
            f"portable-infer (pip install -U portable-infer), or re-export the model with this version's "
            f"exporter (portable-infer export ...)")
    if type(version) is not int or version not in READABLE:  # true and 1.0 are not 1
        raise SchemaVersionError(
            f"manifest schema_version is {version!r}, this portable_infer reads versions {READABLE[0]} to "
            f"{SCHEMA_VERSION} (an integer); re-export the model with this version's exporter "
            f"(portable-infer export ...) or install the matching portable-infer release")


def validate(d) -> None:
    """Raise a :class:`ManifestError` (or SchemaVersionError / UnsafePathError) unless ``d`` is a
    well-formed manifest of a schema this runtime reads: types, ranges, safe paths, and every
    named file listed."""
    if not isinstance(d, dict):
        _fail("the manifest", f"must be a JSON object, got {_kind(d)}")
    check_schema_version(d)
    (MANIFEST_V1 if d["schema_version"] == 1 else MANIFEST).check(d, "")
    _check_consistency(d)


def _check_consistency(d: dict) -> None:
    vocab, tok = d["model"]["vocab_size"], d["tokenizer"]
    ids = [("bos_token_id", tok.get("bos_token_id")), ("pad_token_id", tok.get("pad_token_id"))]
    ids += [(f"eos_token_ids[{i}]", t) for i, t in enumerate(tok.get("eos_token_ids", []))]
    for key, tid in ids:
        if tid is not None and tid >= vocab:
            _fail(f"tokenizer.{key}", f"is {tid}, outside the model's vocabulary of {vocab}")
    names = [v["name"] for v in d["variants"]]
    if len(set(names)) != len(names):
        _fail("variants", f"have duplicate names {sorted(n for n in set(names) if names.count(n) > 1)}")
    folded = set()
    for i, f in enumerate(d["files"]):
        where = f"files[{i}]"
        if f["path"] in RESERVED:
            raise UnsafePathError(f"manifest.json: {where}.path = {f['path']!r} is reserved for the package's "
                                  f"own manifest or signature; re-export the package", field=f"{where}.path",
                                  path=f["path"])
        if f["path"].casefold() in folded:
            _fail(f"{where}.path", f"{f['path']!r} is listed twice (case-insensitively)")
        if not SHA256.fullmatch(f["sha256"]):
            _fail(f"{where}.sha256", "must be 64 lowercase hex digits")
        folded.add(f["path"].casefold())
    _check_agreements(d)


def _check_agreements(d: dict) -> None:
    """Agreement records: no more agreed steps than steps, the two perplexities together."""
    for name, r in d.get("verification", {}).items():
        for key in ("quality", "agreement"):
            q, where = r.get(key), f"verification.{name}.{key}"
            if q is None:
                continue
            agreed, steps = ((q["agreed"], q["steps"]) if "agreed" in q else
                             (int(n) for n in q["top1_agree_steps"].split("/")))
            if agreed > steps:
                _fail(where, f"has {agreed} agreed steps of {steps}")
            if ("perplexity" in q) != ("perplexity_reference" in q):
                _fail(where, "must hold both perplexity and perplexity_reference, or neither")
