"""Tiny GGUF files of every registered family, written as llama.cpp's converter writes them, and
their transformers reference (no pytest here: shared by tests/test_gguf_*.py).

The converter is reimplemented from its rules, independently of ``exporters/``: tensor names from
gguf-py's own ``TensorNameMap`` (what ``convert_hf_to_gguf.py`` uses), Q/K rows permuted for the
llama architecture (Llama, Mistral), +1 on Gemma 3's norm weights, GPT-2's Conv1D weights
transposed to [out, in], Llama 3 RoPE scaling as a ``rope_freqs`` tensor, metadata keys per family.
Weights of the types ``gguf.quants`` can quantize (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, TQ*) are
quantized from the model's float weights, Q2_K/Q4_K/Q5_K/Q6_K by a plain quantizer here; the
others (Q3_K, IQ4_*) are random valid blocks built bytewise. Either way the reference is ``gguf.quants.dequantize`` of the file, mapped back
to HF names and layouts and loaded into ``AutoModelForCausalLM.from_config``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

import gguf

T = gguf.GGMLQuantizationType
HIDDEN = 256  # K-quant rows hold 256-element super-blocks
BASE = dict(vocab_size=256, hidden_size=HIDDEN, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
            head_dim=64, num_hidden_layers=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
            pad_token_id=0)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32, "rope_theta": 10000.0}
# family -> (transformers config class, its kwargs, GGUF architecture)
FAMILIES = {
    "llama": ("LlamaConfig", dict(tie_word_embeddings=False, rope_parameters=LLAMA3_ROPE), "llama"),
    "mistral": ("MistralConfig", dict(tie_word_embeddings=False, sliding_window=None), "llama"),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True), "qwen2"),
    "qwen3": ("Qwen3Config", dict(tie_word_embeddings=False), "qwen3"),
    "phi3": ("Phi3Config", dict(tie_word_embeddings=False), "phi3"),
    "gemma3": ("Gemma3TextConfig", dict(tie_word_embeddings=True, sliding_window=4, query_pre_attn_scalar=64,
                                        layer_types=["sliding_attention", "full_attention"]), "gemma3"),
    "gpt2": ("GPT2Config", dict(vocab_size=256, n_embd=HIDDEN, n_head=4, n_layer=2, n_positions=256,
                                bos_token_id=1, eos_token_id=2, tie_word_embeddings=True), "gpt2"),
}
QUANTIZABLE = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "TQ1_0", "TQ2_0", "BF16")  # gguf.quants.quantize can
# byte offsets of the fp16 scale fields of the types built bytewise: (d offset, dmin offset or
# None, dmin / d that centres the weights near zero)
_F16_FIELDS = {"Q2_K": (80, 82, 1.5), "Q3_K": (108, None, 0), "Q4_K": (0, 2, 7.5), "Q5_K": (0, 2, 15.5),
               "Q6_K": (208, None, 0), "IQ4_NL": (0, None, 0), "IQ4_XS": (0, None, 0), "IQ2_XXS": (0, None, 0)}
WEIGHT_STD = 0.08


def hf_model(family: str, seed: int):
    """A tiny random transformers model of ``family`` (every parameter randomized, norms near 1)."""
    import torch
    import transformers

    cls, kwargs, _ = FAMILIES[family]
    base = {} if family == "gpt2" else BASE
    config = getattr(transformers, cls)(**{**base, **kwargs})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.add_(0.2 * noise) if p.ndim == 1 else p.copy_(WEIGHT_STD * noise)
    return model


# --- blocks --------------------------------------------------------------------------------------
def random_blocks(qtype: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random valid ``qtype`` blocks [rows, bytes] whose dequantized values have std ~ WEIGHT_STD."""
    per, size = gguf.GGML_QUANT_SIZES[T[qtype]]
    d_at, dmin_at, ratio = _F16_FIELDS[qtype]
    raw = rng.integers(0, 256, (rows, cols // per, size), dtype=np.uint8)

    def set_scales(d: np.ndarray) -> None:
        raw[..., d_at:d_at + 2] = d.astype(np.float16)[..., None].view(np.uint8)
        if dmin_at is not None:
            raw[..., dmin_at:dmin_at + 2] = (ratio * d).astype(np.float16)[..., None].view(np.uint8)

    jitter = np.exp(0.3 * rng.standard_normal((rows, cols // per))).astype(np.float32)
    set_scales(jitter)
    std = float(gguf.quants.dequantize(raw.reshape(rows, -1), T[qtype]).std())
    set_scales(jitter * (WEIGHT_STD / std))
    return raw.reshape(rows, -1)


def _pack_k_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins per super-block -> Q4_K/Q5_K's 12 bytes (ggml's packing)."""
    lo = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    mid = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    hi = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    return np.concatenate([lo, mid, hi], axis=1).astype(np.uint8)


K_QUANTIZED = ("Q2_K", "Q4_K", "Q5_K", "Q6_K")  # quantize_k makes these from float weights


def quantize_k(x: np.ndarray, qtype: str) -> np.ndarray:
    """A plain (non-searching) Q2_K / Q4_K / Q5_K / Q6_K quantizer of float rows [rows, cols], laid out as
    ggml lays the blocks out: realistic codes, where random bytes would give clipped zero points."""
    rows, cols = x.shape
    if qtype == "Q6_K":
        return _quantize_q6_k(x)
    if qtype == "Q2_K":
        return _quantize_q2_k(x)
    top = 15 if qtype == "Q4_K" else 31
    sub = x.reshape(-1, 8, 32).astype(np.float32)
    lo = np.minimum(sub.min(-1), 0)
    step = (sub.max(-1) - lo) / top
    d = (step.max(-1) / 63).astype(np.float16)
    dmin = (-lo.min(-1) / 63).astype(np.float16)
    df, dminf = d.astype(np.float32)[:, None], dmin.astype(np.float32)[:, None]
    sc = np.clip(np.rint(step / np.where(df > 0, df, 1)), 0, 63).astype(np.uint8)
    mn = np.clip(np.rint(-lo / np.where(dminf > 0, dminf, 1)), 0, 63).astype(np.uint8)
    s = df * sc
    q = np.clip(np.rint((sub + (dminf * mn)[..., None]) / np.where(s > 0, s, 1)[..., None]), 0, top).astype(np.uint8)
    pairs = q.reshape(-1, 4, 2, 32)
    qs = ((pairs[:, :, 0] & 0x0F) | ((pairs[:, :, 1] & 0x0F) << 4)).reshape(-1, 128)
    parts = [d[:, None].view(np.uint8), dmin[:, None].view(np.uint8), _pack_k_scales(sc, mn)]
    if qtype == "Q5_K":
        parts.append(np.bitwise_or.reduce((q >> 4) << np.arange(8, dtype=np.uint8)[None, :, None], axis=1))
    return np.concatenate(parts + [qs], axis=1).reshape(rows, -1)


def _quantize_q2_k(x: np.ndarray) -> np.ndarray:
    """Q2_K: 2-bit codes, 4-bit scales and mins per 16 weights, fp16 d and dmin per 256."""
    rows, cols = x.shape
    sub = x.reshape(-1, 16, 16).astype(np.float32)
    lo = np.minimum(sub.min(-1), 0)
    step = (sub.max(-1) - lo) / 3
    d = (step.max(-1) / 15).astype(np.float16)
    dmin = (-lo.min(-1) / 15).astype(np.float16)
    df, dminf = d.astype(np.float32)[:, None], dmin.astype(np.float32)[:, None]
    sc = np.clip(np.rint(step / np.where(df > 0, df, 1)), 0, 15).astype(np.uint8)
    mn = np.clip(np.rint(-lo / np.where(dminf > 0, dminf, 1)), 0, 15).astype(np.uint8)
    s = df * sc
    q = np.clip(np.rint((sub + (dminf * mn)[..., None]) / np.where(s > 0, s, 1)[..., None]), 0, 3).astype(np.uint8)
    fields = q.reshape(-1, 2, 4, 32)  # [super, 128-element half, shift, 32 bytes]
    qs = np.bitwise_or.reduce(fields << (2 * np.arange(4, dtype=np.uint8))[None, None, :, None], axis=2)
    return np.concatenate([sc | (mn << 4), qs.reshape(-1, 64), d[:, None].view(np.uint8), dmin[:, None].view(np.uint8)],
                          axis=1).reshape(rows, -1)


def _quantize_q6_k(x: np.ndarray) -> np.ndarray:
    rows, cols = x.shape
    sub = x.reshape(-1, 16, 16).astype(np.float32)
    step = np.abs(sub).max(-1) / 31
    d = (step.max(-1) / 127).astype(np.float16)
    df = d.astype(np.float32)[:, None]
    sc = np.clip(np.rint(step / np.where(df > 0, df, 1)), -128, 127).astype(np.int8)
    s = df * sc
    q = (np.clip(np.rint(sub / np.where(s != 0, s, 1)[..., None]), -32, 31) + 32).astype(np.uint8).reshape(-1, 256)
    halves = q.reshape(-1, 2, 2, 64)  # [super, 128-element half, nibble half, 64]
    ql = ((halves[:, :, 0] & 0x0F) | ((halves[:, :, 1] & 0x0F) << 4)).reshape(-1, 128)
    quarter = (q >> 4).reshape(-1, 2, 4, 32)  # [super, half, shift, 32]
    qh = np.bitwise_or.reduce(quarter << (2 * np.arange(4, dtype=np.uint8))[None, None, :, None], axis=2)
    return np.concatenate([ql, qh.reshape(-1, 64), sc.view(np.uint8), d[:, None].view(np.uint8)],
                          axis=1).reshape(rows, -1)


def encode(data: np.ndarray, qtype: str, rng: np.random.Generator) -> np.ndarray:
    """``data`` [rows, cols] as ``qtype`` bytes: quantized by gguf where it can, by
    :func:`quantize_k` for Q2_K/Q4_K/Q5_K/Q6_K, else random valid blocks."""
    if qtype in QUANTIZABLE:
        return gguf.quants.quantize(np.ascontiguousarray(data, np.float32), T[qtype])
    if qtype in K_QUANTIZED:
        return quantize_k(data, qtype)
    return random_blocks(qtype, *data.shape, rng)


# --- the converter -------------------------------------------------------------------------------
def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute: Q/K rows in ggml's rotary order."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_CONV1D = (".c_attn.weight", ".c_proj.weight", ".c_fc.weight")


def _name_map(model, arch: str) -> dict:
    """HF state-dict name -> GGUF name, by gguf-py's TensorNameMap (the converter's table)."""
    n_layers = model.config.num_hidden_layers
    key = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    table = gguf.get_tensor_name_map(key, n_layers)
    out = {}
    for name in model.state_dict():
        base, _, suffix = name.rpartition(".")
        mapped = table.get_name(base)
        if mapped is not None:
            out[name] = f"{mapped}.{suffix}"
    return out


def _heads(model, name: str) -> int | None:
    c = model.config
    if ".q_proj." in name:
        return c.num_attention_heads
    if ".k_proj." in name:
        return c.num_key_value_heads
    return None


def _to_gguf(model, family: str, name: str, data: np.ndarray) -> np.ndarray:
    if FAMILIES[family][2] == "llama" and _heads(model, name):
        data = _permute(data, _heads(model, name))
    if family == "gemma3" and name.endswith("norm.weight"):
        data = data + 1
    if family == "gpt2" and name.endswith(_CONV1D):
        data = data.T
    return np.ascontiguousarray(data, np.float32)


def _from_gguf(model, family: str, name: str, data: np.ndarray) -> np.ndarray:
    if family == "gpt2" and name.endswith(_CONV1D):
        data = data.T
    if family == "gemma3" and name.endswith("norm.weight"):
        data = data - 1
    if FAMILIES[family][2] == "llama" and _heads(model, name):
        data = _unpermute(data, _heads(model, name))
    return np.ascontiguousarray(data)


def write_gguf(model, family: str, path: Path, type_for, seed: int, extra_tensors: dict | None = None,
               edit_metadata=None) -> dict:
    """Write ``model`` as llama.cpp's converter would, 2-D weights as ``type_for(gguf_name, shape)``
    (a ggml type name; "F32" / "F16" keep float). ``extra_tensors`` ({name: float array}) and
    ``edit_metadata(writer)`` add what a test needs. Returns {gguf name: ggml type name}."""
    rng = np.random.default_rng(seed)
    arch = FAMILIES[family][2]
    w = gguf.GGUFWriter(str(path), arch)
    _metadata(w, model, family)
    if edit_metadata is not None:
        edit_metadata(w)
    for name, data in (extra_tensors or {}).items():
        w.add_tensor(name, np.asarray(data, np.float32))
    types = {}
    tied = model.config.tie_word_embeddings
    names = _name_map(model, arch)
    for name, tensor in model.state_dict().items():
        gname = names.get(name)
        if gname is None or (tied and name == "lm_head.weight"):
            continue
        data = _to_gguf(model, family, name, tensor.detach().numpy())
        qtype = type_for(gname, data.shape) if data.ndim == 2 else "F32"
        types[gname] = qtype
        if qtype in ("F32", "F16"):
            w.add_tensor(gname, data.astype(np.float16 if qtype == "F16" else np.float32))
        else:
            w.add_tensor(gname, encode(data, qtype, rng), raw_dtype=T[qtype])
    if family == "llama" and model.config.rope_parameters.get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", _llama3_factors(model.config))
        types["rope_freqs.weight"] = "F32"
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return types


def _llama3_factors(config) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.generate_extra_tensors: rope_freqs for llama3 RoPE."""
    p = config.rope_parameters
    dim = config.head_dim
    freqs = 1.0 / (p["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    lo_wl = p["original_max_position_embeddings"] / p["low_freq_factor"]
    hi_wl = p["original_max_position_embeddings"] / p["high_freq_factor"]
    out = []
    for f in freqs:
        wl = 2 * math.pi / f
        if wl < hi_wl:
            out.append(1.0)
        elif wl > lo_wl:
            out.append(p["factor"])
        else:
            smooth = (p["original_max_position_embeddings"] / wl - p["low_freq_factor"]) / (
                p["high_freq_factor"] - p["low_freq_factor"])
            out.append(1 / ((1 - smooth) / p["factor"] + smooth))
    return np.array(out, np.float32)


def _metadata(w, model, family: str) -> None:
    c = model.config
    if family == "gpt2":
        w.add_block_count(c.n_layer)
        w.add_context_length(c.n_positions)
        w.add_embedding_length(c.n_embd)
        w.add_feed_forward_length(4 * c.n_embd)
        w.add_head_count(c.n_head)
        w.add_layer_norm_eps(c.layer_norm_epsilon)
    else:
        rope = c.rope_parameters.get("full_attention", c.rope_parameters)
        w.add_block_count(c.num_hidden_layers)
        w.add_context_length(c.max_position_embeddings)
        w.add_embedding_length(c.hidden_size)
        w.add_feed_forward_length(c.intermediate_size)
        w.add_head_count(c.num_attention_heads)
        w.add_head_count_kv(c.num_key_value_heads)
        w.add_layer_norm_rms_eps(c.rms_norm_eps)
        w.add_rope_freq_base(rope["rope_theta"])
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        w.add_rope_dimension_count(int(head_dim * c.rope_parameters.get("partial_rotary_factor", 1.0)))
        if family in ("qwen3", "gemma3"):
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)
    if family == "mistral":
        w.add_name("Mistral tiny")
    if family == "phi3":
        w.add_sliding_window(c.sliding_window or 0)
    if family == "gemma3":
        w.add_sliding_window(c.sliding_window)
        w.add_sliding_window_pattern([t == "sliding_attention" for t in c.layer_types])
    _tokenizer(w)


def _tokenizer(w) -> None:
    """A byte-level BPE vocabulary of 256 tokens (the last one a merge), enough for an export."""
    from tokenizers import pre_tokenizers

    tokens = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens[-1] = tokens[0] + tokens[1]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types([1] * len(tokens))
    w.add_token_merges([f"{tokens[0]} {tokens[1]}"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)


# --- the reference -------------------------------------------------------------------------------
def dequantized(path: Path) -> dict:
    """gguf.quants.dequantize of every tensor, by GGUF name, in HF order ([rows, cols])."""
    out = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))
        out[t.name] = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32).reshape(shape)
    return out


def reference_model(family: str, path: Path, seed: int):
    """``from_config`` of the family's config with the file's dequantized weights, mapped back."""
    import torch

    model = hf_model(family, seed)
    names = _name_map(model, FAMILIES[family][2])
    weights = dequantized(path)
    state = {}
    for name, gname in names.items():
        if gname in weights:
            state[name] = torch.from_numpy(_from_gguf(model, family, name, weights[gname]))
    missing, unexpected = model.load_state_dict(state, strict=False)
    allowed = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    assert not unexpected and set(missing) <= allowed, (missing, unexpected)
    if model.config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()
