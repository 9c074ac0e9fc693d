"""Execution providers: the table, name resolution, session selection with fallback.

Everything that differs between providers (ONNX Runtime's name, default options, install hint,
which graph variants and precisions it runs, in its order of preference) is a row of
:data:`PROVIDERS` (a :class:`~portable_infer.engine.provider_spec.ProviderSpec`); the functions
below only read the table. Which variant of a package each
provider runs is decided by one rule, :func:`portable_infer.engine.variant_choice.choose_variant`, from
the whole package and the user's choices (``static_kv``, ``accuracy_level``).
:func:`select_session` checks what actually ran: ONNX Runtime silently falls back to CPU when a
provider's libraries fail to load, and lists providers it cannot use. ``portable-infer doctor``
reads the same table (``doctor.py``).

Requested providers are ``"auto"``, a key or alias (``"cuda"``, ``"amd"``), ONNX Runtime's name
(``"CUDAExecutionProvider"``), a comma-separated string of those, or a list. The environment
variable ``PORTABLE_INFER_PROVIDERS`` (same syntax) replaces what ``"auto"`` would choose; an
explicit argument other than ``"auto"`` wins over it.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping, Sequence

from portable_infer.errors import InvalidArgumentError, PackageError, ProviderError
from portable_infer.package.manifest import GraphVariant
from portable_infer.engine.provider_spec import ProviderSpec, norm_name
from portable_infer.engine.variant_choice import VariantChoice, choose_variant
from portable_infer.package.variants import (FUSED, FUSED_INT8, FUSED_Q4, ORT_SUFFIX, PAGED, PORTABLE, STATIC, STATIC_INT8,
                                             STATIC_Q4)

logger = logging.getLogger(__name__)

ENV_VAR = "PORTABLE_INFER_PROVIDERS"


def _swap(build: str) -> str:
    """ONNX Runtime builds overwrite each other: one per virtualenv, replacing the CPU one."""
    return f"pip uninstall -y onnxruntime && pip install {build}"


def _opts(**kw) -> Mapping[str, Any]:
    return MappingProxyType(kw)


_CPU_FIRST = ("int4", "int8", "fp32", "fp16")
# The fused variant uses com.microsoft contrib ops; "*-int8" (the same graphs, int8 activations)
# replace their twins when int8 activations are asked for, as do "*-q4" (int8 activations on 4-bit
# weights in MatMulNBits' integer form, ONNX Runtime's fastest CPU kernels); "static" (fixed KV buffers written in
# place; CUDA graphs on CUDA) comes first by default because variant_choice tries the static tier
# before the growing one, not by its place here (the order within a tier).
_FUSED_FIRST = (FUSED, FUSED_INT8, FUSED_Q4, PORTABLE, STATIC, STATIC_INT8, STATIC_Q4, PAGED)  # paged: when asked for
_ORT_FIRST = tuple(n + ORT_SUFFIX for n in (FUSED, FUSED_INT8, PORTABLE))  # pack --ort's graphs
_CUDA_LIBS = "and the CUDA 12/13 + cuDNN 9 libraries on LD_LIBRARY_PATH (PATH on Windows)"
_QNN_HTP = "QnnHtp.dll" if sys.platform == "win32" else "libQnnHtp.so"

PROVIDERS: tuple = (
    ProviderSpec("cuda", "CUDAExecutionProvider", 10, "NVIDIA GPU (CUDA)",
                 f'{_swap("onnxruntime-gpu")} {_CUDA_LIBS}',
                 aliases=("nvidia",), variants=_FUSED_FIRST, graph_options=_opts(enable_cuda_graph="1"),
                 # GroupQueryAttention's decode kernel: XQA by default; without it cuDNN's SDPA. On an H200
                 # at the Llama-3.1-8B shape, 256 rows of 256+ tokens, cuDNN's took 2.9 ms a step against
                 # XQA's 4.0; at one row the step was 5.98 ms against 5.72 (docs/benchmarks.md, session 16): raced.
                 session_envs=_opts(**{"xqa-off": _opts(ORT_ENABLE_XQA="0")}),
                 # use_tf32=0: ORT's CUDA EP rounds fp32 MatMuls to TF32 by default, which made fp32
                 # greedy tokens differ from the CPU's on an H100 (1 of 3 prompts, 128 tokens).
                 default_options=_opts(device_id=0, arena_extend_strategy="kSameAsRequested",
                                       cudnn_conv_algo_search="HEURISTIC", use_tf32=0)),
    ProviderSpec("tensorrt", "TensorrtExecutionProvider", 11, "NVIDIA GPU (TensorRT)",
                 f'{_swap("onnxruntime-gpu")} {_CUDA_LIBS}, plus TensorRT 10',
                 aliases=("trt",), default_options=_opts(device_id=0), companions=("CUDAExecutionProvider",),
                 explicit_only="engine builds take minutes on first run; ask for it explicitly"),
    ProviderSpec("nvtensorrtrtx", "NvTensorRTRTXExecutionProvider", 12, "NVIDIA RTX GPU (TensorRT-RTX)",
                 "pip install onnxruntime-trt-rtx (NVIDIA's build, alone in its virtualenv)",
                 aliases=("trt_rtx", "tensorrt_rtx"), default_options=_opts(device_id=0),
                 explicit_only="compiles engines on first run; ask for it explicitly", min_ort="1.22"),
    ProviderSpec("rocm_legacy", "ROCMExecutionProvider", 20, "AMD GPU (ROCm)",
                 f'{_swap("onnxruntime-rocm")} on ONNX Runtime < 1.23 (the ROCm EP was removed in 1.23: use MIGraphX)',
                 aliases=("amd", "rocm"), default_options=_opts(device_id=0), max_ort="1.23"),
    ProviderSpec("migraphx", "MIGraphXExecutionProvider", 21, "AMD GPU (MIGraphX)",
                 f'{_swap("onnxruntime-migraphx")} (AMD\'s build for your ROCm version)',
                 aliases=("amd", "rocm"), default_options=_opts(device_id=0)),
    ProviderSpec("dml", "DmlExecutionProvider", 30, "DirectX 12 GPU (Windows)",
                 f'{_swap("onnxruntime-directml")} (Windows only)',
                 aliases=("directml",), default_options=_opts(device_id=0)),
    ProviderSpec("coreml", "CoreMLExecutionProvider", 40, "Apple Neural Engine / GPU (macOS)",
                 "the plain onnxruntime wheel for macOS includes CoreML; it runs only on Apple devices",
                 aliases=("apple",), default_options=_opts(ModelFormat="MLProgram", MLComputeUnits="ALL")),
    ProviderSpec("qnn", "QNNExecutionProvider", 50, "Qualcomm NPU (QNN HTP)",
                 f'{_swap("onnxruntime-qnn")} (Snapdragon devices)',
                 aliases=("qualcomm",), precisions=("int8", "fp16", "int4", "fp32"),
                 default_options=_opts(backend_path=_QNN_HTP)),
    ProviderSpec("openvino", "OpenVINOExecutionProvider", 60, "Intel CPU / GPU / NPU (OpenVINO)",
                 f'{_swap("onnxruntime-openvino")}',
                 aliases=("ov", "intel"), precisions=("int8", "int4", "fp32", "fp16"),
                 default_options=_opts(device_type="CPU")),
    ProviderSpec("webgpu", "WebGpuExecutionProvider", 70, "GPU through WebGPU (Dawn)",
                 f'{_swap("onnxruntime-webgpu")}'),
    ProviderSpec("cpu", "CPUExecutionProvider", 100, "CPU",
                 "every ONNX Runtime build includes it; reinstall onnxruntime if it is missing",
                 variants=(*_ORT_FIRST, *_FUSED_FIRST), precisions=_CPU_FIRST),
)
CPU = next(s for s in PROVIDERS if s.key == "cpu")


_BY_NAME = {n: [s for s in PROVIDERS if n in s.names()] for spec in PROVIDERS for n in spec.names()}


def default_ort():
    """The installed onnxruntime module (imported on first use)."""
    import onnxruntime

    return onnxruntime


def _split(requested: str | Sequence[str]) -> list:
    items = (requested.split(",") if isinstance(requested, str)
             else list(requested) if isinstance(requested, (list, tuple)) else [requested])
    if not all(isinstance(i, str) for i in items):
        raise InvalidArgumentError(f"providers must be names (str), got {requested!r}; e.g. 'cuda,cpu'")
    names = [norm_name(i) for i in items if i.strip()]
    if not names:
        raise InvalidArgumentError(f"providers must name at least one provider, got {requested!r}; "
                                   f"use 'auto' or e.g. 'cuda,cpu'")
    if "auto" in names and len(names) > 1:
        raise InvalidArgumentError(f"'auto' cannot be combined with other providers, got {requested!r}")
    return names


def _lookup(name: str, ort_version: str, source: str = "") -> list:
    specs = _BY_NAME.get(norm_name(name))
    if specs is None:
        known = sorted({n for s in PROVIDERS for n in (s.key, *s.aliases)})
        raise ProviderError(f"unknown execution provider {name!r}{source}; known names: auto, "
                            f"{', '.join(known)} (or ONNX Runtime's, e.g. CUDAExecutionProvider)")
    usable = [s for s in specs if s.unsupported_reason(ort_version) is None]
    if not usable:
        why = "; ".join(f"{s.ort_name}: {s.unsupported_reason(ort_version)}" for s in specs)
        raise ProviderError(f"provider {name!r}{source} cannot run on ONNX Runtime {ort_version}: {why}; "
                            f"install: {specs[0].install_hint}")
    return sorted(usable, key=lambda s: s.priority)


def resolve_request(requested: str | Sequence[str], ort_version: str) -> tuple:
    """(specs, explicit) for :func:`resolve`'s ``requested``; explicit is False only for auto
    without the environment override."""
    names, source = _split(requested), ""
    if names == ["auto"] and os.environ.get(ENV_VAR, "").strip():
        names, source = _split(os.environ[ENV_VAR]), f" (from {ENV_VAR})"
        if names != ["auto"]:
            logger.info("%s=%s replaces the auto choice", ENV_VAR, os.environ[ENV_VAR])
    if names == ["auto"]:
        specs = [s for s in PROVIDERS if not s.explicit_only and s.unsupported_reason(ort_version) is None]
        return sorted(specs, key=lambda s: s.priority), False
    out: list = []
    for name in names:
        out += [s for s in _lookup(name, ort_version, source) if s not in out]
    return out, True


def resolve(requested: str | Sequence[str] = "auto", ort_version: str | None = None) -> list:
    """Turn a provider request into table rows, in the order they will be tried.

    Args:
        requested: "auto", a key/alias/ONNX Runtime name, a comma-separated string or a list.
            For "auto", ``PORTABLE_INFER_PROVIDERS`` (when set) is resolved instead.
        ort_version: the ONNX Runtime version to resolve for (default: the installed one);
            "rocm"/"amd" give MIGraphX on >= 1.23 and ROCm then MIGraphX before.
    Returns:
        list of :class:`ProviderSpec`, no duplicates. Availability is not checked here.
    Example:
        >>> [s.key for s in resolve("amd,cpu", "1.22.0")]
        ['rocm_legacy', 'migraphx', 'cpu']
    """
    return resolve_request(requested, ort_version or default_ort().__version__)[0]


@dataclass(frozen=True)
class Selection:
    """The session that runs, which provider and graph variant it uses, and what was passed over."""

    session: Any
    provider: ProviderSpec
    variant: GraphVariant
    skipped: tuple = ()  # ((provider key, reason), ...)
    graph_capture: bool = False  # the session took the row's graph_options (CUDA graphs)
    session_env: str = ""  # the provider's session_envs entry it was made with ("": as is)


def _option_overrides(provider_options: Mapping | None, ort_version: str) -> dict:
    out: dict = {}
    for name, opts in (provider_options or {}).items():
        if not isinstance(opts, Mapping):
            raise InvalidArgumentError(f"provider_options[{name!r}] must be a dict of option -> value, "
                                       f"got {type(opts).__name__}")
        for spec in _lookup(name, ort_version, " (in provider_options)"):
            out.setdefault(spec.key, {}).update(opts)
    return out


def select_session(variants: Sequence[GraphVariant], package_dir: str | os.PathLike,
                   requested: str | Sequence[str] = "auto", *, strict: bool = False,
                   session_options: Any = None, provider_options: Mapping | None = None,
                   choice: VariantChoice = VariantChoice(), ort: Any = None, session_env: str = "") -> Selection:
    """Create an ONNX Runtime session on the best provider that really works.

    Args:
        variants: the package's graph variants (``Manifest.variants``).
        package_dir: the package directory; variant files are relative to it.
        requested: see :func:`resolve`. "auto" tries every available table row by priority.
        strict: raise :class:`ProviderError` as soon as a named provider is missing or any
            provider fails to start, instead of warning and trying the next (then CPU).
        session_options: an ``onnxruntime.SessionOptions`` (default: a fresh one per attempt).
        provider_options: {provider name: {option: value}} merged over the table's defaults.
        choice: the user's variant choices and the package's int8 gate: each provider runs the variant it
            prefers under them (:func:`~portable_infer.engine.variant_choice.choose_variant`), or is skipped.
        ort: the onnxruntime module (tests pass a fake).
        session_env: an entry of the provider's ``session_envs`` to make the session with ("": as is).
    Returns:
        :class:`Selection`; ``skipped`` says why each provider tried before it was passed over.
    Example:
        >>> sel = select_session(manifest.variants, "pkg/", "cuda")
        >>> sel.provider.key, sel.variant.name
        ('cuda', 'static')
    """
    ort = ort if ort is not None else default_ort()
    specs, explicit = resolve_request(requested, ort.__version__)
    overrides = _option_overrides(provider_options, ort.__version__)
    available = list(ort.get_available_providers())
    package_dir = Path(package_dir)
    skipped: list = []

    def give_up(spec: ProviderSpec, reason: str, detail: str) -> None:
        if strict:
            raise ProviderError(f"{spec.key} ({spec.ort_name}) {detail}; to fix: {spec.install_hint}",
                                provider=spec.key, reason=reason.split(":", 1)[0])
        logger.warning("%s (%s) %s; trying the next provider", spec.key, spec.ort_name, detail)
        skipped.append((spec.key, reason))

    fallback = explicit and not strict and CPU not in specs
    for spec in specs + ([CPU] if fallback else []):
        if spec is CPU and fallback:
            logger.warning("none of the requested providers (%s) works; falling back to CPU",
                           ", ".join(s.key for s in specs))
        if spec.ort_name not in available:
            if explicit:
                conflict = build_conflict_warning(installed_builds())
                give_up(spec, "not available: not in this ONNX Runtime build",
                        f"is not in this ONNX Runtime build ({ort.__version__}, providers: "
                        f"{', '.join(available)})" + (f"; {conflict}" if conflict else ""))
            continue
        variant, why = choose_variant(spec, variants, choice)
        if variant is None:
            _no_variant(spec, why, explicit and strict, explicit, skipped)
            continue
        path = package_dir / variant.file
        if not path.is_file():
            raise PackageError(f"{path} (variant {variant.name!r}) is missing; re-copy or re-export the package")
        env = _env_values(spec, session_env)  # an unknown name is refused, not taken for a provider failure
        try:
            session, graphs = _start(ort, spec, variant, path, overrides.get(spec.key, {}), available,
                                     session_options, env)
        except Exception as exc:  # ORT raises many types (Fail, RuntimeError, ...) for a broken EP
            give_up(spec, f"failed: {type(exc).__name__}: {exc}",
                    f"failed to start on {variant.file}: {type(exc).__name__}: {exc}")
            continue
        actual = list(session.get_providers())
        if actual[:1] == [spec.ort_name]:
            logger.info("running %s (%s, %s) on %s", variant.file, variant.name, variant.precision, spec.ort_name)
            return Selection(session, spec, variant, tuple(skipped), graphs, session_env)
        got = actual[0] if actual else "no provider"
        give_up(spec, f"failed: session fell back to {got}",
                f"was listed but the session runs on {got} (its libraries did not load; "
                f"ONNX Runtime's log says which)")
    tried = "; ".join(f"{k}: {r}" for k, r in skipped) or "none of them is in this ONNX Runtime build"
    raise ProviderError(f"no execution provider could run {package_dir} (asked for "
                        f"{', '.join(s.key for s in specs)}): {tried}; run `portable-infer doctor`")


def _no_variant(spec: ProviderSpec, why: str, refuse: bool, named: bool, skipped: list) -> None:
    """A provider left with no variant it may run: refused (``refuse``: named, strict), else
    skipped with ``why`` (a warning where it was named, else a note)."""
    reason = f"no suitable variant: {why}"
    if refuse:
        raise ProviderError(f"{spec.key}: {reason}; re-export the package with a variant it runs, or "
                            f"load it without the choices that rule them out", provider=spec.key,
                            reason="no suitable variant")
    (logger.warning if named else logger.info)("%s skipped: %s", spec.key, reason)
    skipped.append((spec.key, reason))


_ENV_LOCK = threading.Lock()


def _env_values(spec: ProviderSpec, name: str) -> Mapping[str, str]:
    if name and name not in spec.session_envs:
        raise ValueError(f"{spec.key} has no session environment {name!r} (it has: "
                         f"{', '.join(spec.session_envs) or 'none'})")
    return spec.session_envs.get(name, {})


@contextmanager
def session_env_vars(values: Mapping[str, str]):
    """``values`` in the process environment while a session is made (ONNX Runtime reads some
    kernel switches there as it builds the kernels), then the environment as it was; one such
    session at a time."""
    if not values:
        yield
        return
    with _ENV_LOCK:
        saved = {k: os.environ.get(k) for k in values}
        os.environ.update(values)
        try:
            yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def _start(ort: Any, spec: ProviderSpec, variant: GraphVariant, path: Path, user: Mapping, available: list,
           sess_options: Any, env: Mapping[str, str]) -> tuple:
    """(session, graph capture on), made with ``env`` set (:func:`session_env_vars`). A static-KV
    or paged-KV graph (their decode steps are captured) first asks for the row's ``graph_options`` (CUDA graphs) unless the user's options say
    otherwise; a session that refuses them (e.g. nodes placed off the device) is made again without them."""
    sess_options = sess_options if sess_options is not None else ort.SessionOptions()
    tail = ([(n, {}) for n in spec.companions if n in available]
            + ([] if spec is CPU else [(CPU.ort_name, {})]))

    def make(options: Mapping):
        with session_env_vars(env):
            return ort.InferenceSession(str(path), sess_options, providers=[(spec.ort_name, dict(options))] + tail)

    graph = {**spec.default_options, **spec.graph_options, **user}
    if (variant.kv.growth in ("static", "paged") and spec.graph_options
            and all(graph.get(k) == v for k, v in spec.graph_options.items())):
        try:
            return make(graph), True
        except Exception as exc:  # noqa: BLE001  (then the plain session says what is wrong, if anything)
            hint = (" (fp32 packages: GroupQueryAttention has no fp32 CUDA kernel; export with --precision "
                    "fp16 or --activations fp16 for graphs)" if variant.kv.dtype == "float32" else "")
            logger.warning("%s refused graph capture for %s: %s: %s%s; running it without",
                           spec.key, variant.file, type(exc).__name__, exc, hint)
    return make({**spec.default_options, **user}), False


# --- installed builds (``portable-infer doctor`` is doctor.py) ---------------------------------------
ORT_DISTRIBUTIONS = (
    "onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino", "onnxruntime-directml", "onnxruntime-qnn",
    "onnxruntime-rocm", "onnxruntime-migraphx", "onnxruntime-training", "onnxruntime-webgpu",
    "onnxruntime-trt-rtx", "onnxruntime-silicon", "ort-nightly", "ort-nightly-gpu",
)


def installed_builds() -> list:
    """[(distribution name, version)] of the ONNX Runtime builds installed in this environment."""
    out = []
    for dist in ORT_DISTRIBUTIONS:
        try:
            out.append((dist, metadata.version(dist)))
        except metadata.PackageNotFoundError:
            pass
    return out


def build_conflict_warning(builds: Sequence[tuple]) -> str | None:
    """A warning when more than one ONNX Runtime build is installed, else None."""
    if len(builds) <= 1:
        return None
    names = [name for name, _ in builds]
    return (f"{len(builds)} ONNX Runtime builds are installed together "
            f"({', '.join(f'{n} {v}' for n, v in builds)}): they all install the `onnxruntime` package "
            f"and overwrite each other's files, so which providers work depends on install order. "
            f"Keep one build per virtualenv: pip uninstall -y {' '.join(names)}, then "
            f"pip install the one for your hardware")
