"""A random-weight model of Llama-3.2-1B's shape, written once, for the CPU comparison.

Decode speed depends on shapes, not on values, so the second model of ``compare_cpu.py`` is
Llama-3.2-1B's shape with seeded random weights (no download): hidden 2048, intermediate 8192,
16 layers, 32 heads, 8 KV heads, head_dim 64, vocab 128,256, tied embeddings, rope_theta 500000
(without Llama 3's ``llama3`` RoPE scaling, which changes no shape or cost). Every linear and the
tied embedding ~ N(0, 0.02), RMSNorm weights 1: each layer's output is then as large as its
input, so the logits depend on every layer (not flat, not the input token echoed).

Files, under ``.bench/llama1b/``::

    hf/              config.json, model.safetensors (fp32), a trivial byte-level tokenizer
    llama1b.Q4_0.gguf    gguf-py's writer and quantizer: Q4_0 linears, the tied embedding/head
                         at Q8_0 (llama-quantize would give it Q6_K, which gguf-py cannot write)
    llama1b.F16.gguf     gguf-py's writer, F16 (input of the next one; deleted after it)
    llama1b.Q4_K_M.gguf  llama.cpp's own quantizer (``llama_model_quantize`` through
                         llama-cpp-python): gguf 0.19's ``gguf.quants`` only dequantizes K-quants
    reference.json   transformers fp32 greedy continuation of ``common.PROMPT_IDS`` (KV cache)

The tokenizer: 256 byte tokens (GPT-2's byte-to-unicode alphabet), one merge ("Ġ Ġ"), filler
tokens up to 128,000 and Llama 3's special-token ids (128000 begin_of_text, 128001 end_of_text,
128009 eot_id ...). Every runner is fed token ids; the tokenizer exists because the exporters
want one, and is the same in the HF folder and in the GGUFs.

Steps run in the venv that has their libraries (the module itself imports only the standard
library and ``setup_steps.py``): ``hf``, ``gguf-*`` and ``reference`` in setup_competitors'
``transformers`` venv, ``q4_k_m`` in its ``llamacpp`` venv. ``ensure`` (called by
setup_competitors.py) drives them.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from setup_steps import BENCH, MARK, REPO, ensure_export, genai_export, run_logged, venv_python

logger = logging.getLogger("llama1b")

ROOT = BENCH / "llama1b"
HF = ROOT / "hf"
REFERENCE = ROOT / "reference.json"
PACKAGE = BENCH / "packages" / "llama1b"  # ours: portable-infer export HF -o PACKAGE --precision int4
GENAI_INT4 = BENCH / "models" / "llama1b" / "ortgenai-int4"
# both at int4 blocks of 128 (export --block 128; GenAI's builder block_size=128): the same trade of
# agreement for bytes a weight on either side
BLOCK = 128
PACKAGE_B128 = BENCH / "packages" / f"llama1b-b{BLOCK}"
GENAI_INT4_B128 = BENCH / "models" / "llama1b" / f"ortgenai-int4-b{BLOCK}"
# ours with symmetric int4 (export --symmetric), GenAI's builder's default form
PACKAGE_SYM = BENCH / "packages" / "llama1b-sym"
SEED = 1234
STD = 0.02
BOS, EOS, EOT = 128000, 128001, 128009
N_SPECIAL = 256

CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama",
    "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
    "vocab_size": 128256, "tie_word_embeddings": True, "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
    "initializer_range": STD, "bos_token_id": BOS, "eos_token_id": EOS,
    # Both spellings: transformers 5 reads rope_parameters, 4.x and older tools rope_theta.
    "rope_theta": 500000.0, "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
    "dtype": "float32", "torch_dtype": "float32",
}
# Special tokens that get Llama 3's names; the others are reserved_special_token_N.
SPECIAL_NAMES = {0: "<|begin_of_text|>", 1: "<|end_of_text|>", 6: "<|start_header_id|>",
                 7: "<|end_header_id|>", 8: "<|eom_id|>", 9: "<|eot_id|>"}
MERGE = ("Ġ", "Ġ")


def gguf_path(kind: str) -> Path:
    """``kind``: Q4_0, F16 or Q4_K_M."""
    return ROOT / f"llama1b.{kind}.gguf"


# ---- tensors -----------------------------------------------------------------------------------

def tensor_shapes() -> list[tuple[str, tuple[int, ...]]]:
    """HF names and shapes in a fixed order (the order the seeded generator fills them in)."""
    c = CONFIG
    e, f, d = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
    out = [("model.embed_tokens.weight", (c["vocab_size"], e))]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (e,)),
                (p + "self_attn.q_proj.weight", (q, e)), (p + "self_attn.k_proj.weight", (kv, e)),
                (p + "self_attn.v_proj.weight", (kv, e)), (p + "self_attn.o_proj.weight", (e, q)),
                (p + "post_attention_layernorm.weight", (e,)),
                (p + "mlp.gate_proj.weight", (f, e)), (p + "mlp.up_proj.weight", (f, e)),
                (p + "mlp.down_proj.weight", (e, f))]
    return out + [("model.norm.weight", (e,))]


def gguf_name(hf_name: str) -> str:
    """llama.cpp's tensor name for an HF Llama tensor (as convert_hf_to_gguf.py names them)."""
    table = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    if hf_name in table:
        return table[hf_name]
    layer = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
             "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    _, _, i, rest = hf_name.split(".", 3)
    return f"blk.{i}.{layer[rest.rsplit('.', 1)[0]]}.weight"


def permute_for_gguf(w, n_head: int):
    """HF's rotate-half Q/K rows to llama.cpp's interleaved RoPE pairs (convert_hf_to_gguf's
    ``LlamaModel.permute``)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---- tokenizer ---------------------------------------------------------------------------------

def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (the byte-level BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def vocab() -> list[str]:
    byte_chars = bytes_to_unicode()
    tokens = [byte_chars[b] for b in range(256)] + ["".join(MERGE)]
    first_special = CONFIG["vocab_size"] - N_SPECIAL
    tokens += [f"<filler_{i}>" for i in range(len(tokens), first_special)]
    reserved = iter(range(N_SPECIAL))
    for i in range(N_SPECIAL):
        tokens.append(SPECIAL_NAMES.get(i) or f"<|reserved_special_token_{next(reserved)}|>")
    assert len(tokens) == len(set(tokens)) == CONFIG["vocab_size"]
    return tokens


def write_tokenizer(out: Path) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tokens = vocab()
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[MERGE]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    first = CONFIG["vocab_size"] - N_SPECIAL
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens[first:]])
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": tokens[BOS],
        "eos_token": tokens[EOS], "model_max_length": CONFIG["max_position_embeddings"],
        "clean_up_tokenization_spaces": False, "add_bos_token": False}, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps({
        "bos_token_id": BOS, "eos_token_id": [EOS, EOT], "do_sample": False}, indent=2) + "\n")


# ---- steps (transformers venv) -----------------------------------------------------------------

def write_hf(out: Path) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)
    print(f"seed {SEED}, linears and embedding ~ N(0, {STD}), norms 1", flush=True)
    tensors = {}
    for name, shape in tensor_shapes():
        if len(shape) == 1:
            tensors[name] = np.ones(shape, np.float32)
        else:
            tensors[name] = rng.standard_normal(shape, dtype=np.float32) * np.float32(STD)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(CONFIG, indent=2) + "\n")
    write_tokenizer(out)
    print(f"wrote {out}: {sorted(p.name for p in out.iterdir())}")


def write_gguf(hf: Path, out: Path, kind: str) -> None:
    """GGUF from the HF folder's weights: ``kind`` Q4_0 (head Q8_0) or F16; norms stay F32."""
    import gguf
    import numpy as np
    from safetensors import safe_open

    c = CONFIG
    qtype = {"Q4_0": gguf.GGMLQuantizationType.Q4_0, "F16": gguf.GGMLQuantizationType.F16}[kind]
    head_type = gguf.GGMLQuantizationType.Q8_0 if kind == "Q4_0" else qtype
    ftype = {"Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "F16": gguf.LlamaFileType.MOSTLY_F16}[kind]
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_name("llama1b-random")
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(c["hidden_size"])
    w.add_block_count(c["num_hidden_layers"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(c["num_attention_heads"])
    w.add_head_count_kv(c["num_key_value_heads"])
    w.add_rope_dimension_count(c["head_dim"])
    w.add_rope_freq_base(c["rope_theta"])
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    w.add_vocab_size(c["vocab_size"])
    w.add_file_type(ftype)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tokens = vocab()
    first = c["vocab_size"] - N_SPECIAL
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.NORMAL] * first + [gguf.TokenType.CONTROL] * N_SPECIAL)
    w.add_token_merges([" ".join(MERGE)])
    w.add_bos_token_id(BOS)
    w.add_eos_token_id(EOS)
    w.add_eot_token_id(EOT)
    w.add_add_bos_token(False)
    with safe_open(str(hf / "model.safetensors"), "np") as f:
        for name, _ in tensor_shapes():
            data = f.get_tensor(name)
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                heads = c["num_attention_heads"] if "q_proj" in name else c["num_key_value_heads"]
                data = permute_for_gguf(data, heads)
            if data.ndim == 1:
                w.add_tensor(gguf_name(name), data.astype(np.float32))
                continue
            t = head_type if name == "model.embed_tokens.weight" else qtype
            q = gguf.quants.quantize(np.ascontiguousarray(data, dtype=np.float32), t)
            w.add_tensor(gguf_name(name), q, raw_dtype=t)
            print(f"{gguf_name(name)} {t.name}", flush=True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"wrote {out}")


def write_reference(hf: Path, out: Path) -> None:
    """The fp32 greedy continuation of common.PROMPT_IDS (transformers, KV cache), with how far
    apart the top two logits were (a flat model would make every comparison a coin toss)."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    sys.path.insert(0, str(Path(__file__).resolve().parent / "runners"))
    import common

    model, info = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32, output_loading_info=True)
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if bad:
        raise SystemExit(f"{hf} does not load cleanly: {bad}")
    model.eval()
    ids = torch.tensor([list(common.PROMPT_IDS)])
    config = GenerationConfig(do_sample=False, eos_token_id=None, pad_token_id=0, bos_token_id=BOS,
                              max_new_tokens=common.NEW_TOKENS, min_new_tokens=common.NEW_TOKENS)
    with torch.inference_mode():
        out_ids = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
        logits = model(out_ids).logits[0]
    top2 = logits.topk(2, dim=-1).values
    margin = (top2[:, 0] - top2[:, 1]).median().item()
    continuation = out_ids[0, ids.shape[1]:].tolist()
    out.write_text(json.dumps({
        "prompt_ids": list(common.PROMPT_IDS), "continuation": continuation,
        "logit_std": round(logits.std().item(), 4), "median_top2_margin": round(margin, 4),
        "distinct_tokens": len(set(continuation)),
        "source": f"transformers {__import__('transformers').__version__} fp32, random Llama-3.2-1B "
                  f"shape (seed {SEED}), greedy with KV cache",
    }) + "\n")
    print(f"reference: {continuation}; logit std {logits.std().item():.3f}, median top-2 margin {margin:.3f}")


def quantize_q4_k_m(src: Path, dst: Path, threads: int = 2) -> None:
    """llama.cpp's quantizer (what ``llama-quantize SRC DST Q4_K_M`` does), in the llamacpp venv."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize returned {rc}")
    print(f"wrote {dst}")


def ensure(competitors: list[str]) -> None:
    """Each step whose output is missing, in the venv it needs (run by setup_competitors.py):
    the HF folder and reference always; the GGUFs for llamacpp; GenAI's int4 export for ortgenai."""
    py, llama_py = str(venv_python("transformers")), str(venv_python("llamacpp"))
    steps = [("hf", HF / "model.safetensors", py), ("reference", REFERENCE, py)]
    if "llamacpp" in competitors:
        steps += [("gguf-q4_0", gguf_path("Q4_0"), py), ("gguf-f16", gguf_path("F16"), py),
                  ("q4_k_m", gguf_path("Q4_K_M"), llama_py)]
    for step, out, python in steps:
        done = ROOT / f"{step}{MARK}"
        if done.is_file() or (step == "gguf-f16" and (ROOT / f"q4_k_m{MARK}").is_file()):
            logger.info("llama1b %s: done before, skipped", step)
            continue
        logger.info("llama1b %s: into %s", step, out.relative_to(REPO))
        run_logged([python, __file__, step], f"llama1b-{step}")
        done.write_text("ok\n")
        if step == "q4_k_m":
            gguf_path("F16").unlink(missing_ok=True)  # 2.5 GB, the quantizer's input only
    if "ortgenai" in competitors:
        ensure_export(genai_export(GENAI_INT4, "int4", "genai-llama1b-int4"), HF, "llama1b-ortgenai-int4")
        ensure_export(genai_export(GENAI_INT4_B128, "int4", f"genai-llama1b-int4-b{BLOCK}", BLOCK), HF,
                      f"llama1b-ortgenai-int4-b{BLOCK}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("step", choices=["hf", "gguf-q4_0", "gguf-f16", "q4_k_m", "reference"])
    a = p.parse_args()
    if a.step == "hf":
        write_hf(HF)
    elif a.step == "gguf-q4_0":
        write_gguf(HF, gguf_path("Q4_0"), "Q4_0")
    elif a.step == "gguf-f16":
        write_gguf(HF, gguf_path("F16"), "F16")
    elif a.step == "q4_k_m":
        quantize_q4_k_m(gguf_path("F16"), gguf_path("Q4_K_M"))
    else:
        write_reference(HF, REFERENCE)


if __name__ == "__main__":
    main()
