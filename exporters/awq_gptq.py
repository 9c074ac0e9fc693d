"""AWQ and GPTQ checkpoints: 4-bit ``qweight``/``qzeros``/``scales`` tensors read as exact blocks.

A quantized linear ``X`` is stored as ``X.qweight``, ``X.qzeros``, ``X.scales`` (and, GPTQ,
``X.g_idx``) in place of ``X.weight``. Both formats mean, per group of ``group_size`` input
features, ``W[o, i] = (q[o, i] - z[o, g]) * s[o, g]``, with 4-bit q and z packed eight to an int32
(nibble k at bits 4k..4k+3)::

                 qweight               qzeros                      scales      order in a word
    AWQ (GEMM)   [in, out/8]           [in/g, out/8]               [in/g, out]  out cols 0 2 4 6 1 3 5 7
    GPTQ         [in/8, out]           [in/g, out/8]               [in/g, out]  sequential
                 (packed along in)     v1: stored word = z - 0x11111111 (the "zeros + 1" convention)

:func:`read_weight` turns them into :class:`~exporters.quant.Blocks` (``int4``: uint8 q and zero
points, float32 scales, block = group size), which the weight store writes to MatMulNBits with
zero points and to DequantizeLinear unchanged: the graph computes with exactly (q - z) * s. The
checkpoint's fp16 embedding and lm_head go in as in every package of its precision (8-bit blocks
in int4 packages with fp32 activations), and :func:`reference_model` holds them so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from portable_infer.errors import SourceError, UnsupportedArchitectureError

from .quant import Blocks, quantize

METHODS = ("awq", "gptq")
GROUP_SIZES = (32, 64, 128)
AWQ_ORDER = np.array([0, 2, 4, 6, 1, 3, 5, 7])  # output column (within 8) held by nibble k
AWQ_UNORDER = np.argsort(AWQ_ORDER)  # nibble that holds output column c: [0, 4, 1, 5, 2, 6, 3, 7]
AWQ_VERSIONS = ("gemm",)
GPTQ_FORMATS = {"gptq": 1, "gptq_v2": 2}  # checkpoint_format -> zero-point convention
V1_ZERO_BIAS = np.uint32(0x11111111)  # v1 stores every zero point minus 1, as one int32 subtraction
PARTS = ("qweight", "qzeros", "scales", "g_idx")
# Where the quantization settings live when config.json has none (AutoGPTQ, AutoAWQ side files)
SIDE_FILES = ("quantize_config.json", "quant_config.json")
_SHIFTS = np.arange(0, 32, 4, dtype=np.uint32)


@dataclass(frozen=True)
class QuantSpec:
    """What a checkpoint's quantization_config says, checked."""

    method: str  # "awq" | "gptq"
    bits: int
    group: int
    gptq_format: int = 1  # GPTQ: 1 = v1 ("zeros + 1"), 2 = v2 (zeros as they are)

    @classmethod
    def from_config(cls, cfg: dict, where: str) -> "QuantSpec":
        """Validate a quantization_config dict (transformers', AutoGPTQ's or AutoAWQ's keys)."""
        method = str(cfg.get("quant_method") or ("awq" if "w_bit" in cfg else "gptq")).lower()
        if method not in METHODS:
            raise SourceError(
                f"{where}: quantization method {method!r} is not supported; supported: {list(METHODS)}. "
                f"Export the float checkpoint instead (the exporter quantizes it itself: --precision int4)",
                param="quant_method", reason="unsupported")
        bits = int(cfg.get("bits", cfg.get("w_bit", 4)))
        group = int(cfg.get("group_size", cfg.get("q_group_size", 128)))
        if bits != 4:
            raise SourceError(f"{where}: {method.upper()} with {bits}-bit weights is not supported; only "
                              f"4-bit checkpoints are read (MatMulNBits int4)", param="bits", reason="unsupported")
        if group not in GROUP_SIZES:
            raise SourceError(f"{where}: {method.upper()} group_size {group} is not supported; supported: "
                              f"{list(GROUP_SIZES)} (per-channel -1 too is refused: re-quantize with groups)",
                              param="group_size", reason="unsupported")
        if method == "awq":
            return cls._awq(cfg, where, bits, group)
        return cls._gptq(cfg, where, bits, group)

    @classmethod
    def _awq(cls, cfg: dict, where: str, bits: int, group: int) -> "QuantSpec":
        version = str(cfg.get("version", "gemm")).lower()
        if version not in AWQ_VERSIONS:
            raise SourceError(f"{where}: AWQ version {version!r} is not supported; supported: {list(AWQ_VERSIONS)} "
                              f"(AutoAWQ's GEMM packing: re-save the model with version='gemm')",
                              param="version", reason="unsupported")
        if not cfg.get("zero_point", True):
            raise SourceError(f"{where}: AWQ without zero points is not supported; quantize with zero_point=True",
                              param="zero_point", reason="unsupported")
        return cls("awq", bits, group)

    @classmethod
    def _gptq(cls, cfg: dict, where: str, bits: int, group: int) -> "QuantSpec":
        if cfg.get("desc_act"):
            raise SourceError(
                f"{where}: GPTQ with desc_act=True (act-order: groups follow a permutation g_idx) is not "
                f"supported; re-quantize with desc_act=False (GPTQModel/AutoGPTQ QuantizeConfig(desc_act=False))",
                param="desc_act", reason="unsupported")
        fmt = str(cfg.get("checkpoint_format") or cfg.get("format") or "gptq").lower()
        if fmt not in GPTQ_FORMATS:
            raise SourceError(f"{where}: GPTQ checkpoint_format {fmt!r} is not supported; supported: "
                              f"{sorted(GPTQ_FORMATS)} (convert it back with GPTQModel's save in format 'gptq')",
                              param="checkpoint_format", reason="unsupported")
        return cls("gptq", bits, group, GPTQ_FORMATS[fmt])


def quant_spec(folder: Path, config: dict) -> QuantSpec | None:
    """The checkpoint's QuantSpec (config.json's quantization_config, else a side file), or None."""
    cfg, where = config.get("quantization_config"), folder / "config.json"
    if cfg is None:
        for name in SIDE_FILES:
            if (folder / name).is_file():
                where = folder / name
                try:
                    cfg = json.loads(where.read_text(encoding="utf-8"))
                except json.JSONDecodeError as exc:
                    raise SourceError(f"{where} is not valid JSON ({exc}); fix or re-download it") from exc
                break
    if cfg is None:
        return None
    if not isinstance(cfg, dict):
        raise SourceError(f"{where}: quantization_config must be an object, got {type(cfg).__name__}")
    spec = QuantSpec.from_config(cfg, str(where))
    from .architectures import MODEL_TYPES

    if config.get("model_type") not in MODEL_TYPES:
        raise UnsupportedArchitectureError(
            f"{folder}: {spec.method.upper()} checkpoints are read by the direct graph builder only, which "
            f"does not know model_type {config.get('model_type')!r}; supported: {sorted(MODEL_TYPES)}")
    return spec


def quantized_weights(spec: QuantSpec, shapes: dict[str, tuple], conv1d: bool = False) -> dict[str, tuple]:
    """``{"X.weight": shape}`` for every quantized linear ``X`` among the tensor ``shapes``, in the
    layout the float checkpoint has ([out, in]; [in, out] for GPT-2's Conv1D)."""
    out = {}
    for name, shape in shapes.items():
        if not name.endswith(".qweight"):
            continue
        prefix = name.removesuffix(".qweight")
        missing = [p for p in ("qzeros", "scales") if f"{prefix}.{p}" not in shapes]
        if missing:
            raise SourceError(f"{prefix}: the {spec.method.upper()} checkpoint lacks {missing}; it is "
                              f"incomplete: re-download it")
        rows, cols = shape
        n_in, n_out = (rows, cols * 8) if spec.method == "awq" else (rows * 8, cols)
        out[prefix + ".weight"] = (n_in, n_out) if conv1d else (n_out, n_in)
    return out


def read_weight(spec: QuantSpec, parts: dict, prefix: str) -> Blocks:
    """The linear ``prefix`` as int4 Blocks [out, in], from its stored ``parts`` (qweight, qzeros,
    scales, g_idx if stored)."""
    qweight, qzeros = _u32(parts["qweight"]), _u32(parts["qzeros"])
    scales = np.asarray(parts["scales"], dtype=np.float32)
    if spec.method == "awq":
        q = unpack_awq(qweight)  # [in, out]
        zeros = unpack_awq(qzeros)  # [in/g, out]
    else:
        q = unpack_gptq_rows(qweight)
        if spec.gptq_format == 1:
            qzeros = qzeros + V1_ZERO_BIAS  # wraps mod 2^32: the inverse of v1's word-wise "- 1"
        zeros = unpack_gptq_cols(qzeros)
    n_in, n_out = q.shape
    if n_in % spec.group:
        raise SourceError(f"{prefix}: {n_in} input features are not a multiple of group_size {spec.group}")
    groups = n_in // spec.group
    for part, arr, want in (("qzeros", zeros, (groups, n_out)), ("scales", scales, (groups, n_out))):
        if arr.shape != want:
            raise SourceError(f"{prefix}.{part} is {list(arr.shape)}, expected {list(want)} for a "
                              f"{list(q.shape)} weight in groups of {spec.group}; the checkpoint does "
                              f"not match its quantization_config")
    if parts.get("g_idx") is not None:
        _check_g_idx(np.asarray(parts["g_idx"]), prefix, n_in, spec.group)
    return Blocks("int4", np.ascontiguousarray(q.T), np.ascontiguousarray(scales.T),
                  zero=np.ascontiguousarray(zeros.T), block=spec.group)


def _check_g_idx(g_idx: np.ndarray, prefix: str, n_in: int, group: int) -> None:
    """Groups in order (desc_act=False) or refuse: a permuted g_idx is act-order quantization."""
    g_idx = g_idx.astype(np.int64).reshape(-1)
    trivial = np.arange(n_in) // group
    if g_idx.shape != trivial.shape or np.any(g_idx != trivial):
        raise SourceError(
            f"{prefix}.g_idx is not the trivial order i // {group}: the checkpoint was quantized with "
            f"act-order (desc_act=True), which is not supported; re-quantize with desc_act=False",
            param="g_idx", reason="unsupported")


def _u32(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype not in (np.int32, np.uint32):
        raise SourceError(f"packed 4-bit tensors must be int32, got {a.dtype}")
    return a.view(np.uint32)


def _nibbles(words: np.ndarray) -> np.ndarray:
    """[..., n] uint32 -> [..., n, 8] nibbles, nibble k from bits 4k..4k+3."""
    return ((words[..., None] >> _SHIFTS) & 0xF).astype(np.uint8)


def unpack_awq(words: np.ndarray) -> np.ndarray:
    """AWQ GEMM words [rows, cols/8] -> [rows, cols]: nibble k of word c holds column 8c + AWQ_ORDER[k]."""
    nib = _nibbles(words)  # [rows, cols/8, 8]
    return nib[..., AWQ_UNORDER].reshape(words.shape[0], -1)


def unpack_gptq_rows(words: np.ndarray) -> np.ndarray:
    """GPTQ qweight [in/8, out] -> [in, out]: nibble k of word row p holds input row 8p + k."""
    nib = _nibbles(words)  # [in/8, out, 8]
    return nib.transpose(0, 2, 1).reshape(-1, words.shape[1])


def unpack_gptq_cols(words: np.ndarray) -> np.ndarray:
    """GPTQ qzeros [groups, out/8] -> [groups, out]: nibble k of word c holds column 8c + k."""
    return _nibbles(words).reshape(words.shape[0], -1)


def reference_model(src, table_bits: int | None = None):
    """The transformers float model on the dequantized weights (config.json without its
    quantization_config; no AWQ/GPTQ kernel package needed): the reference verify compares with.

    ``table_bits``: the width the package holds the float embedding and lm_head tables at
    (``weights.WeightForm.table_bits``: 8 in int4 packages with fp32 activations). The reference
    holds them rounded the same way, so it computes what the package's graphs must compute exactly:
    the checkpoint's blocks as they are, and its fp16 tables as every int4 package stores them."""
    from portable_infer.errors import require

    from .architectures import family_for

    torch, transformers = require("torch"), require("transformers")
    cfg = {k: v for k, v in src.config.items() if k != "quantization_config"}
    config = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    names = family_for(config.model_type).layout(src.config).names
    tables = {names.get("embed"), names.get("lm_head")} if table_bits else set()
    state = {}
    for name in sorted(src.names()):
        w = src.get(name)
        if isinstance(w, Blocks):
            w = w.dequantize()
        elif name in tables:  # as weights.WeightStore rounds a float table (quant.quantize)
            w = quantize(np.asarray(w, dtype=np.float32), table_bits).dequantize()
        state[name] = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise SourceError(f"{src.path}: the dequantized weights do not fit the {config.model_type} model "
                          f"(missing {sorted(set(missing) - tied)[:4]}, unexpected {sorted(unexpected)[:4]})")
    if tied:
        model.tie_weights()
    return model.eval()
