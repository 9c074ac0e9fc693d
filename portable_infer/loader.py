"""``load()``: a package directory (or the default model) -> a ready :class:`Model`."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from .chat_template import ChatTemplate
from .errors import InvalidArgumentError, PackageError, PortableInferError
from .home import ensure_default_model
from .manifest import Manifest
from .model import Model, check_max_kv_tokens
from .ort_format import ORT_SUFFIX
from .providers import select_session
from .session import Engine, SessionConfig

logger = logging.getLogger(__name__)

CHECKS = ("sha256", "size", "none")
ACCURACY_LEVELS = (None, 1, 4)


@dataclass(frozen=True)
class LoadConfig:
    providers: object = "auto"
    strict: bool = False
    check: str = "sha256"  # how package files are checked against the manifest
    session: SessionConfig = SessionConfig()
    provider_options: dict | None = None
    trust: object = None  # bundles only: the Ed25519 public key (PEM path or bytes) it must be signed with
    max_kv_tokens: int | None = None  # cap on the context (prompt + generated tokens held in the KV cache)
    static_kv: bool | None = None  # the static-KV variant: None = when the package has it (see load)


def load(path: str | os.PathLike | None = None, providers="auto", *, strict: bool = False,
         intra_op_threads: int = 0, accuracy_level: int | None = None, check: str = "sha256",
         provider_options: dict | None = None, low_memory: bool = False, trust=None,
         max_kv_tokens: int | None = None, static_kv: bool | None = None) -> Model:
    """Load a model package on the best (or the named) execution provider.

    Args:
        path: a package directory or a ``.pinf`` bundle (checked, then unpacked once into
            ``$PORTABLE_INFER_HOME/bundles``); None loads the default model (exported on first use).
        providers: "auto", a name ("cuda", "cpu", "openvino", ORT's own names) or a list;
            the PORTABLE_INFER_PROVIDERS environment variable overrides "auto".
        strict: raise instead of falling back when a provider fails.
        intra_op_threads: ONNX Runtime threads (0 = its default).
        accuracy_level: MatMulNBits activations. None (default): int8 where the package has
            int8-activation graphs (``static-int8``/``fused-int8``) whose export verification
            measured at least 98 % top-1 agreement with the float reference, else float. 1: float
            (the exact graphs). 4: int8 (required: an int4 package without them is refused);
            ONNX Runtime then also fuses the portable graph's QDQ pairs at 4.
        check: "sha256" (every file hashed), "size" (sizes only) or "none".
        provider_options: {provider name: {option: value}} over the table's defaults.
        low_memory: no memory arena or pattern planning (lower peak RSS, a little slower);
            ``.ort`` graphs are memory-mapped and their weights used in place.
        trust: an Ed25519 public key (PEM path or bytes): a bundle must be signed by it
            (:class:`SignatureError` otherwise). See ``docs/edge.md``.
        max_kv_tokens: at most this many tokens (prompt + generated) in the KV cache: caps the
            context below the model's, bounding the cache's memory.
        static_kv: run the package's ``static`` variant: KV in fixed buffers that the graph writes
            in place (no per-step copy of the cache), and on CUDA each decode step captured once
            as a CUDA graph and replayed (falls back to plain runs when capture fails). None (the
            default): when the package has it (exports of rotary models without sliding windows
            do, since 0.3.0; ``static-int8`` with int8 activations), unless the package carries
            ORT-format graphs; False: never; True: required.

    Returns:
        :class:`Model`; ``model.provider`` says what really runs.

    Example:
        >>> import portable_infer
        >>> m = portable_infer.load()                     # doctest: +SKIP
        >>> m.generate("The capital of France is", max_new_tokens=8)  # doctest: +SKIP
    """
    session = SessionConfig(intra_op_threads=intra_op_threads, accuracy_level=accuracy_level,
                            enable_mem_pattern=not low_memory, enable_cpu_mem_arena=not low_memory,
                            map_weights=low_memory)
    return load_package(path, LoadConfig(providers, strict, check, session, provider_options, trust, max_kv_tokens,
                                         static_kv))


def load_package(path, cfg: LoadConfig) -> Model:
    import onnxruntime as ort

    if cfg.check not in CHECKS:
        raise InvalidArgumentError(f"check must be one of {CHECKS}, got {cfg.check!r}")
    check_max_kv_tokens(cfg.max_kv_tokens)  # before any session is made
    if cfg.session.accuracy_level not in ACCURACY_LEVELS:
        raise InvalidArgumentError(
            f"accuracy_level must be one of {ACCURACY_LEVELS} (None: int8 activations where the package's "
            f"int8 graphs passed the quality gate; 1: float; 4: int8), got {cfg.session.accuracy_level!r}")
    pkg = Path(path) if path is not None else ensure_default_model(progress=True)
    if pkg.is_file() or cfg.trust is not None:  # a .pinf bundle: checked, unpacked once, then a directory
        from .bundle import open_bundle

        pkg = open_bundle(pkg, trust=cfg.trust)
    if not pkg.exists():
        raise PackageError(f"model package {pkg} does not exist; export one with "
                           f"`portable-infer export SOURCE -o {pkg}` or omit the path for the default model")
    manifest = Manifest.load(pkg)
    if cfg.check != "none":
        manifest.verify_files(pkg, hash_files=cfg.check == "sha256")
    sel, graphs = _select_auto(manifest, pkg, cfg, ort)
    for key, reason in sel.skipped:
        logger.info("provider %s skipped: %s", key, reason)
    if sel.variant.kv.growth == "static":
        from .static_engine import StaticEngine

        context = min(manifest.model.max_context, cfg.max_kv_tokens or manifest.model.max_context)
        engine = StaticEngine(sel.session, sel.variant, sel.provider.ort_name, ort, max_context=context,
                              vocab_size=manifest.model.vocab_size, cuda_graph=graphs)
    else:
        engine = Engine(sel.session, sel.variant, sel.provider.ort_name, ort)
    tokenizer, template = _tokenizer(pkg, manifest)
    logger.info("loaded %s: variant %s on %s", pkg, sel.variant.name, sel.provider.ort_name)
    return Model(manifest, engine, tokenizer, template, pkg, sel, max_kv_tokens=cfg.max_kv_tokens)


def _is_int8(v) -> bool:
    """An int8-activation graph: fused-int8, static-int8 (or their ``-ort`` copies)."""
    return v.name.removesuffix(ORT_SUFFIX).endswith(INT8_SUFFIX)


def _passed_gate(manifest: Manifest, v) -> bool:
    """Export verification recorded the variant's agreement at PREFERRED_AGREEMENT or more."""
    report = (manifest.verification or {}).get(v.name.removesuffix(ORT_SUFFIX), {})
    return report.get("quality", {}).get("top1_agreement", 0.0) >= PREFERRED_AGREEMENT


def _int8_wanted(cfg: LoadConfig) -> bool | None:
    """accuracy_level 4: int8 activations required; 1: float; None: int8 where a twin passed the gate."""
    return {4: True, 1: False}.get(cfg.session.accuracy_level)


def _auto_static(manifest: Manifest, cfg: LoadConfig) -> bool:
    """static_kv=None: a static variant of the asked-for activations when the package has one,
    unless it carries ORT-format graphs (packed for them)."""
    int8 = _int8_wanted(cfg)
    return (any(v.kv.growth == "static" and int8 in (None, _is_int8(v)) for v in manifest.variants)
            and not any(v.name.endswith(ORT_SUFFIX) for v in manifest.variants))


def _select_auto(manifest: Manifest, pkg: Path, cfg: LoadConfig, ort):
    """(selection, CUDA graphs on), trying the static variant first when ``static_kv`` is None
    and it applies; a provider that cannot run it (OpenVINO, DirectML, ...) gets the others."""
    int8 = _int8_wanted(cfg)
    if cfg.static_kv is not None or not _auto_static(manifest, cfg):
        return _select(_variants(manifest, pkg, bool(cfg.static_kv), int8), pkg, cfg, ort)
    import dataclasses

    try:
        return _select(_variants(manifest, pkg, True, int8), pkg, dataclasses.replace(cfg, static_kv=True), ort)
    except PortableInferError as exc:
        logger.info("static-KV variant not used (%s); selecting among the others", exc)
        return _select(_variants(manifest, pkg, False, int8), pkg, cfg, ort)


def _select(variants: list, pkg: Path, cfg: LoadConfig, ort):
    """(selection, CUDA graphs on). With ``static_kv`` the session first asks for CUDA graphs;
    if that session cannot start (e.g. nodes placed off CUDA), it is made again without them."""
    def select(options):
        return select_session(variants, pkg, cfg.providers, strict=cfg.strict,
                              session_options=cfg.session.session_options(ort), provider_options=options, ort=ort)

    if not cfg.static_kv:
        return select(cfg.provider_options), False
    base = cfg.provider_options or {}
    try:
        return select({**base, "cuda": {**base.get("cuda", {}), "enable_cuda_graph": "1"}}), True
    except PortableInferError as exc:
        if "graph capture" in str(exc):
            logger.warning("CUDA graphs refused for this graph: some nodes run off CUDA (fp32 packages: "
                           "GroupQueryAttention has no fp32 CUDA kernel; export with --precision fp16 or "
                           "--activations fp16 for graphs); decoding without CUDA graphs")
        else:
            logger.warning("session with CUDA graphs failed (%s); trying without", exc)
        return select(cfg.provider_options), False


INT8_SUFFIX = "-int8"  # fused-int8, static-int8: their exact twins with int8 activations
# accuracy_level None runs an int8 twin only when export verification measured at least this
# teacher-forced top-1 agreement with the float reference (the quality gate of int4 packages)
PREFERRED_AGREEMENT = 0.98
EXACT_TWINS = ("fused", "fused-ort", "portable-ort", "static")  # what an int8 variant replaces


def _variants(manifest: Manifest, pkg: Path, static_kv: bool, int8: bool | None = False) -> list:
    """The variants selection may choose from: the static ones or the others; with ``int8`` the
    int8-activation graph in place of its exact twin (and ahead of the portable graph's ORT-format
    copy), else the exact ones; ``int8`` None: the int8 graph where the pool has one."""
    pool = [v for v in manifest.variants if (v.kv.growth == "static") == static_kv]
    if static_kv and not pool:
        raise PackageError(f"{pkg} has no static-KV variant; re-export it with "
                           f"`portable-infer export SOURCE -o {pkg} --variants portable,fused,static`")
    eight = [v for v in pool if _is_int8(v)]
    if int8 is None:  # a twin below the gate runs only when it has no exact twin in the pool
        int8 = bool(eight) and (all(_passed_gate(manifest, v) for v in eight) or len(eight) == len(pool))
    elif not int8 and all(_is_int8(v) for v in manifest.variants):  # accuracy_level=1 asked for
        raise PackageError(
            f"accuracy_level=1 asks for float activations, and {pkg} has only int8-activation graphs "
            f"({', '.join(v.name for v in manifest.variants)}); load it with accuracy_level=4 (or None), "
            f"or re-export it with the exact variants: `portable-infer export SOURCE -o {pkg} --precision int4`")
    if not int8:
        return [v for v in pool if v not in eight]
    if eight:
        return [v for v in pool if v.name not in EXACT_TWINS]
    if not static_kv and any(v.name.startswith("fused") for v in pool):
        raise PackageError(
            f"accuracy_level=4 asks for int8 activations, and {pkg} has no fused-int8 graph (int4 exports "
            f"keep it unless it falls below the 90 % agreement floor; its fused graph keeps the accuracy it was exported "
            f"with); re-export it with `portable-infer export SOURCE -o {pkg} --precision int4` or load it "
            f"with accuracy_level=1")
    return pool  # static without an int8 twin, or portable only (ONNX Runtime fuses QDQ pairs at 4)


def _tokenizer(pkg: Path, manifest: Manifest):
    info = manifest.tokenizer
    tokenizer = template = None
    if info.file:
        from tokenizers import Tokenizer

        try:
            tokenizer = Tokenizer.from_file(str(pkg / info.file))
        except Exception as exc:  # tokenizers raises a bare Exception on a bad file
            raise PackageError(f"{pkg / info.file} could not be read ({exc}); re-export the package") from exc
    if info.chat_template_file:
        specials = {}
        if tokenizer is not None:
            for key, tid in (("bos_token", info.bos_token_id), ("eos_token", (info.eos_token_ids or (None,))[0])):
                if tid is not None:
                    specials[key] = tokenizer.id_to_token(tid)
        template = ChatTemplate((pkg / info.chat_template_file).read_text(encoding="utf-8"), specials)
    return tokenizer, template
