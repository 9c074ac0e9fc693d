"""The exporter <-> runtime contract: ``manifest.json`` of a model package.

The schema is the dataclasses below, versioned by :data:`SCHEMA_VERSION`. The exporter writes it,
the runtime reads it and takes every graph I/O name, shape and KV layout from it; nothing is
guessed from tensor-name substrings.

Package layout (paths are relative to the package directory)::

    manifest.json            this file
    model.onnx (+ .data)     the portable graph, weights as external data
    model.fused.onnx (+ ...) optional fused variant for CPU/CUDA
    tokenizer.json           Hugging Face `tokenizers` file
    tokenizer_config.json    special tokens, add_bos
    chat_template.jinja      the chat template (optional)
    generation_config.json   generation defaults (eos ids, ...)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from portable_infer.errors import ChecksumError, PackageError
from portable_infer.package.manifest_schema import SCHEMA_VERSION, validate
from portable_infer.package.package_paths import check_listed, open_regular, resolve_inside
from portable_infer.package.verification import VariantReport, read_reports

MANIFEST_NAME = "manifest.json"
MAX_MANIFEST_BYTES = 16 << 20

# Names shared with ONNX Runtime GenAI and optimum.
INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
LOGITS = "logits"
# Static-KV graphs only: the mask's width as an int32 scalar on the host (GroupQueryAttention reads
# it there; computing it from a shape in the graph would put nodes on the CPU and rule out CUDA graphs).
TOTAL_SEQUENCE_LENGTH = "total_sequence_length"
# Static-KV graphs (exporter 0.2.1 on): the argmax of each row's logits, int64 [B, 1], so greedy
# decoding on a GPU copies one id per row to the host instead of the whole vocabulary's logits.
NEXT_TOKEN = "next_token"
# Paged-KV graphs (growth "paged"): a step's tokens packed sequence after sequence, the KV in blocks
# of a pool (exporters/lowering/paged.py describes the contract).
CUMULATIVE_SEQUENCE_LENGTH = "cumulative_sequence_length"
PAST_SEQLENS = "past_seqlens"
BLOCK_TABLE = "block_table"
LOGITS_INDEX = "logits_index"  # int64 [N]: the token of each sequence whose logits the step returns
# int32 [2] on the host: the step's longest new-token run and longest KV (PagedAttention sizes its
# launch from them instead of reading the lengths back from the device in every layer)
ATTENTION_METADATA = "attention_metadata"


def past_names(layer: int) -> tuple[str, str]:
    return f"past_key_values.{layer}.key", f"past_key_values.{layer}.value"


def present_names(layer: int) -> tuple[str, str]:
    return f"present.{layer}.key", f"present.{layer}.value"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: "int64", "float32", "float16"
    shape: tuple  # ints and symbolic dim names

    @classmethod
    def from_dict(cls, d: dict) -> "TensorSpec":
        return cls(name=d["name"], dtype=d["dtype"], shape=tuple(d["shape"]))


@dataclass(frozen=True)
class ModelDims:
    """Architecture and dimensions of the exported model."""

    architecture: str  # registry family, e.g. "llama"
    model_type: str  # the source's model_type, e.g. "smollm" -> family "llama"
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    max_context: int
    rope_theta: float | None = None
    rope_scaling: dict | None = None
    sliding_window: int | None = None
    layer_types: tuple = ()  # per layer: "full_attention" | "sliding_attention"
    tie_word_embeddings: bool = False


@dataclass(frozen=True)
class KVLayout:
    """How the KV cache travels through the graph.

    ``layout`` "BHSD" means [batch, kv_heads, seq, head_dim], "blocks" [blocks, block_size,
    kv_heads, head_dim] (a pool of blocks). ``growth`` "concat": the graph returns past+seq rows
    in ``present`` (the runtime feeds them back); "static": the graph writes in place into a
    preallocated buffer of ``max_context`` rows; "paged": into the pool's blocks that each
    sequence's block table names (layout "blocks").
    """

    layout: str
    dtype: str
    num_kv_heads: int
    head_dim: int
    growth: str
    past: tuple  # ((key_name, value_name), ...) per layer
    present: tuple

    @classmethod
    def from_dict(cls, d: dict) -> "KVLayout":
        return cls(
            layout=d["layout"], dtype=d["dtype"], num_kv_heads=d["num_kv_heads"],
            head_dim=d["head_dim"], growth=d["growth"],
            past=tuple(tuple(p) for p in d["past"]), present=tuple(tuple(p) for p in d["present"]),
        )


@dataclass(frozen=True)
class GraphVariant:
    """One ONNX graph of the package and where it may run."""

    name: str  # "portable" | "fused"
    file: str
    precision: str  # "fp32" | "fp16" | "int8" | "int4" | "q4_1" ...
    opset: int
    domains: tuple  # operator domains used besides the default one, e.g. ("com.microsoft",)
    providers: tuple  # providers this variant targets; "*" = any
    inputs: tuple  # TensorSpec
    outputs: tuple
    kv: KVLayout
    logits: str = "all"  # "all" positions or "last" position only
    # "masked" (MatMul/Softmax, any call shape) or "gqa" (GroupQueryAttention: ONNX Runtime
    # refuses batch > 1 with several new tokens after a past; the engine splits such calls by row)
    attention: str = "masked"
    # the block export(block=) asked of the int4/int8 weights quantized from a float source, where
    # other than the default 32 (None: 32, or the source's own blocks); a row it does not divide is
    # in blocks of the largest halving that does (quant.fitting_block)
    weight_block: int | None = None
    # export(symmetric=True): its int4 weights quantized from a float source without zero points
    weight_symmetric: bool = False

    @classmethod
    def from_dict(cls, d: dict) -> "GraphVariant":
        return cls(
            name=d["name"], file=d["file"], precision=d["precision"], opset=d["opset"],
            domains=tuple(d["domains"]), providers=tuple(d["providers"]),
            inputs=tuple(TensorSpec.from_dict(t) for t in d["inputs"]),
            outputs=tuple(TensorSpec.from_dict(t) for t in d["outputs"]),
            kv=KVLayout.from_dict(d["kv"]), logits=d.get("logits", "all"),
            attention=d.get("attention", "masked"), weight_block=d.get("weight_block"),
            weight_symmetric=d.get("weight_symmetric", False),
        )


@dataclass(frozen=True)
class TokenizerInfo:
    file: str | None = "tokenizer.json"
    config_file: str | None = "tokenizer_config.json"
    chat_template_file: str | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple = ()
    pad_token_id: int | None = None
    add_bos: bool = False


@dataclass(frozen=True)
class GenerationDefaults:
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0


@dataclass(frozen=True)
class FileEntry:
    path: str
    sha256: str
    size: int


@dataclass(frozen=True)
class Manifest:
    schema_version: int
    exporter_version: str
    source: dict  # {"kind": "hf"|"gguf", "path": ..., "sha256": ...}
    model: ModelDims
    precision: str
    variants: tuple
    tokenizer: TokenizerInfo
    generation: GenerationDefaults
    files: tuple = ()
    verification: dict[str, VariantReport] = field(default_factory=dict)  # by variant name (verification.py)

    # --- (de)serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = _plain(dataclasses.asdict(dataclasses.replace(self, verification={})))
        d["verification"] = {name: r.to_json() for name, r in self.verification.items()}
        for v in d["variants"]:  # written only where set: a default package reads as before
            if v["weight_block"] is None:
                del v["weight_block"]
            if not v["weight_symmetric"]:
                del v["weight_symmetric"]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, d: dict) -> "Manifest":
        """A Manifest from parsed JSON, after :func:`~portable_infer.package.manifest_schema.validate`:
        a malformed one raises ManifestError (SchemaVersionError, UnsafePathError), a PackageError.
        A schema-1 manifest is read as the schema-2 one it converts to (its verification report
        typed: ``verification.from_schema1``); saving it writes schema 2."""
        validate(d)
        m, t = d["model"], d["tokenizer"]
        manifest = cls(
            schema_version=SCHEMA_VERSION,
            exporter_version=d["exporter_version"],
            source=dict(d["source"]),
            model=ModelDims(**{**m, "layer_types": tuple(m.get("layer_types", ()))}),
            precision=d["precision"],
            variants=tuple(GraphVariant.from_dict(v) for v in d["variants"]),
            tokenizer=TokenizerInfo(**{**t, "eos_token_ids": tuple(t.get("eos_token_ids", ()))}),
            generation=GenerationDefaults(**d["generation"]),
            files=tuple(FileEntry(**f) for f in d["files"]),
            verification=read_reports(d.get("verification", {}), d["schema_version"]),
        )
        check_listed(manifest)
        return manifest

    @classmethod
    def from_bytes(cls, data: bytes, where: str, error=PackageError) -> "Manifest":
        """Parse manifest bytes read from ``where``; unreadable JSON raises ``error``."""
        return cls.from_dict(parse_json(data, where, error))

    @classmethod
    def load(cls, package_dir: str | os.PathLike) -> "Manifest":
        path = resolve_inside(Path(package_dir), MANIFEST_NAME, MANIFEST_NAME)
        if not path.is_file():
            raise PackageError(
                f"{path} not found: {package_dir} is not a model package; create one with "
                f"`portable-infer export SOURCE -o {package_dir}`"
            )
        with open_regular(path, MANIFEST_NAME) as f:
            data = f.read(MAX_MANIFEST_BYTES + 1)
        return cls.from_bytes(data, str(path))

    def save(self, package_dir: str | os.PathLike) -> None:
        Path(package_dir, MANIFEST_NAME).write_text(self.to_json(), encoding="utf-8")

    # --- queries ------------------------------------------------------------------------------
    def variant(self, name: str) -> GraphVariant:
        for v in self.variants:
            if v.name == name:
                return v
        raise PackageError(f"package has no graph variant {name!r}; it has {[v.name for v in self.variants]}")

    def verify_files(self, package_dir: str | os.PathLike, *, hash_files: bool = True) -> None:
        """Check that every listed file exists with its size (and sha256 when ``hash_files``).

        Each path is first confined to the package (``package_paths.resolve_inside``): a listed
        file that resolves outside it is refused before anything about it is read."""
        for i, entry in enumerate(self.files):
            field = f"files[{i}].path"
            path = resolve_inside(Path(package_dir), entry.path, field)
            with open_regular(path, field) as f:
                size = os.fstat(f.fileno()).st_size
                if size != entry.size:
                    raise ChecksumError(
                        f"{path} is {size} bytes, the manifest says {entry.size}: the file is truncated "
                        f"or replaced; re-copy or re-export the package"
                    )
                if hash_files and sha256_stream(f) != entry.sha256:
                    raise ChecksumError(
                        f"{path} does not match the sha256 in manifest.json: the file is corrupted; "
                        f"re-copy or re-export the package"
                    )


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    with open(path, "rb") as f:
        return sha256_stream(f, chunk)


def sha256_stream(f, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    while block := f.read(chunk):
        h.update(block)
    return h.hexdigest()


def parse_json(data: bytes, where: str, error=PackageError) -> dict:
    """``data`` as a JSON object, or ``error``: too large, not UTF-8, not JSON, nested too deep,
    an integer too long, NaN/Infinity, a key given twice (parsers disagree on which one wins)."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise error(f"{where}: {MANIFEST_NAME} is over {MAX_MANIFEST_BYTES >> 20} MiB; the package is corrupted")

    def pairs(items):
        keys = [k for k, _ in items]
        if len(set(keys)) != len(keys):
            raise ValueError(f"duplicate key {next(k for k in keys if keys.count(k) > 1)!r}")
        return dict(items)

    def constant(name):
        raise ValueError(f"{name} is not JSON")

    try:
        obj = json.loads(data.decode("utf-8"), object_pairs_hook=pairs, parse_constant=constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)[:200]
        raise error(f"{where} is not valid JSON ({reason}); the package is corrupted, re-export it") from None
    if not isinstance(obj, dict):
        raise error(f"{where} does not hold a JSON object; the package is corrupted, re-export it")
    return obj


def file_entries(package_dir: str | os.PathLike, known: dict[str, str] | None = None) -> tuple:
    """FileEntry for every file of a package directory except the manifest itself, sorted.

    ``known``: sha256 digests already computed (by relative path), e.g. by the exporter while it
    wrote a weight file; the other files are read and hashed here."""
    root = Path(package_dir)
    out = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST_NAME):
        rel = path.relative_to(root).as_posix()
        digest = (known or {}).get(rel) or sha256_file(path)
        out.append(FileEntry(rel, digest, path.stat().st_size))
    return tuple(out)


def _plain(obj: Any) -> Any:
    """Tuples -> lists, recursively, so JSON round-trips compare equal."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj
