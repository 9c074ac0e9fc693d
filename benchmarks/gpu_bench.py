"""The whole GPU run in one script (issue: every execution provider for real, CUDA on an H100).

Run on the GPU machine after installing the carried onnxruntime-gpu (+ onnxruntime-genai-cuda)
wheels (see ../shared/gpu/README.md); `benchmarks/gpu_run.sh` does the install and calls this.

    python3 benchmarks/gpu_bench.py --out $OUT

It builds a random-weight model of SmolLM2-135M's exact shape (decode speed depends on shapes,
not values), exports it with our exporter (fp32, fp16, int4), and measures, in the same run:
  - portable_infer on CUDAExecutionProvider (fused variant, IO binding, KV on the device);
  - ONNX Runtime GenAI (its own builder on the same HF folder), default and CUDA-graph mode;
  - transformers fp16 eager generate.
Prompt 32 tokens, 128 new tokens, greedy, decode tokens/s over all sequences, median of 3 after 2 warm-up runs.
Correctness: fp32 greedy tokens on CUDA == CPU; fp16 top-1 agreement with fp32 over 128 steps.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
             num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0, tie_word_embeddings=True,
             rms_norm_eps=1e-5, max_position_embeddings=2048)
PROMPT, NEW, RUNS = 32, 128, 3
WARMUP = 2  # every runtime gets the same warm-up runs


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def make_hf(folder: Path) -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**SHAPE, bos_token_id=1, eos_token_id=2)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(folder)
    # GenAI's builder wants tokenizer files; a byte-level BPE stands in (we feed ids anyway).
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    vocab = {f"t{i}": i for i in range(SHAPE["vocab_size"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "t1", "eos_token": "t2", "unk_token": "t0"}))


def prompts(batch: int, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    return rng.integers(3, SHAPE["vocab_size"], (batch, PROMPT)).tolist()


def ours(pkg: Path, batch: int, static_kv: bool = False) -> dict:
    import portable_infer
    from portable_infer.decode.generate import BatchDecoder

    m = portable_infer.load(pkg, providers="cuda", strict=True, check="size", static_kv=static_kv)
    ps = prompts(batch)
    rates, ttft = [], []
    for run in range(WARMUP + RUNS):
        dec = BatchDecoder(m.engine, ps, [m.params(max_new_tokens=NEW, ignore_eos=True)] * batch,
                           max_context=m.max_context, pad_id=0)  # prefill
        t = time.perf_counter()
        dec.run()  # the whole loop: NEW - 1 forwards and the sampling, as GenAI's timed loop
        if run >= WARMUP:  # the first runs are warm-up (CUDA graph capture, GPU clocks)
            rates.append(batch * dec.timings["decode_steps"] / (time.perf_counter() - t))
            ttft.append(dec.timings["prefill_s"] * 1000)
    graphs = getattr(m.engine, "cuda_graph", False)
    return {"provider": m.provider, "variant": m.variant + (" + CUDA graphs" if graphs else ""),
            "decode_tok_s": statistics.median(rates), "ttft_ms": statistics.median(ttft)}


def correctness(pkgs: dict) -> dict:
    """fp32 greedy on CUDA == CPU; top-1 agreement with the fp32 greedy sequence, teacher-forced,
    of the fp16 fused graph and of the fp16 CUDA-graph decode loop (static KV; random weights have
    many near-ties, so free-running fp16 sequences drift apart where fp32 itself is ambiguous)."""
    import portable_infer

    load = lambda pkg, **kw: portable_infer.load(pkg, providers="cuda", strict=True, check="size", **kw)  # noqa: E731
    fp32_gpu, fp16, static = load(pkgs["fp32"]), load(pkgs["fp16"]), load(pkgs["fp16"], static_kv=True)
    fp32_cpu = portable_infer.load(pkgs["fp32"], providers="cpu", check="size")
    same, total, agree = 0, 0, {"fp16": 0, "static": 0}
    for seed in range(3):
        p = prompts(1, seed=100 + seed)[0]
        g = fp32_gpu.generate_ids(p, max_new_tokens=NEW, ignore_eos=True)
        same += int(g == fp32_cpu.generate_ids(p, max_new_tokens=NEW, ignore_eos=True))
        for name, m in (("fp16", fp16), ("static", static)):  # static: every step after the first replays
            logits = m.forward_logits(p + g)
            agree[name] += int((logits[len(p) - 1:-1].argmax(-1) == np.asarray(g)).sum())
        total += len(g)
    graphs = "CUDA graphs" if static.engine.cuda_graph else "no graphs"
    return {"fp32_gpu_equals_cpu_prompts": f"{same}/3",
            "fp16_top1_agreement": f"{agree['fp16']}/{total} ({agree['fp16'] / total:.1%})",
            "fp16_static_cuda_graph_top1_agreement": f"{agree['static']}/{total} ({agree['static'] / total:.1%}; {graphs})"}


def transformers_fp16(folder: Path, batch: int) -> dict:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float16).cuda().eval()
    ids = torch.tensor(prompts(batch), device="cuda")
    rates = []
    for run in range(WARMUP + RUNS):
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        if run >= WARMUP:
            rates.append(batch * NEW / (time.perf_counter() - t))
    return {"decode_tok_s": statistics.median(rates), "note": "whole generate() incl. prefill"}


def genai(model_dir: Path, batch: int, cuda_graph: bool) -> dict:
    import onnxruntime_genai as og

    config = og.Config(str(model_dir))
    config.clear_providers()
    config.append_provider("cuda")
    if cuda_graph:
        config.set_provider_option("cuda", "enable_cuda_graph", "1")
    model = og.Model(config)
    ps = np.asarray(prompts(batch), dtype=np.int32)
    rates = []
    for run in range(WARMUP + RUNS):
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=PROMPT + NEW, min_length=PROMPT + NEW,
                                  batch_size=batch)
        gen = og.Generator(model, params)
        gen.append_tokens(ps)
        t = time.perf_counter()
        for _ in range(NEW - 1):
            gen.generate_next_token()
        if run >= WARMUP:
            rates.append(batch * (NEW - 1) / (time.perf_counter() - t))
    return {"decode_tok_s": statistics.median(rates)}


def attempt(fn, *a) -> dict:
    try:
        return fn(*a)
    except Exception as exc:  # a competitor mode that fails is a result, not a crash
        return {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}


def package(work: Path, prec: str) -> Path:
    """``work/pkg-<prec>``: the SmolLM2-shaped random model (``work/hf``) exported at ``prec`` with
    the portable, fused and static variants; made when missing."""
    from exporters.export import export

    hf, pkg = work / "hf", work / f"pkg-{prec}"
    if (pkg / "manifest.json").exists():
        return pkg
    if not (hf / "config.json").exists():
        make_hf(hf)
    t = time.perf_counter()
    # int4 weights with fp16 activations: CUDA's GroupQueryAttention is fp16/bf16 only
    export(hf, pkg, precision=prec, verify=False, overwrite=True, variants=("portable", "fused", "static"),
           activations="fp16" if prec == "int4" else None)
    log(f"exported {prec} in {time.perf_counter() - t:.1f}s")
    return pkg


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/gpubench")
    ap.add_argument("--out", default=".")
    ap.add_argument("--skip-genai", action="store_true")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    hf = work / "hf"
    pkgs = {prec: package(work, prec) for prec in ("fp32", "fp16", "int4")}

    results = {"device": subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                        capture_output=True, text=True).stdout.strip()}
    import onnxruntime as ort
    results["onnxruntime"] = ort.__version__
    results["providers"] = ort.get_available_providers()
    rows = {}
    for prec in ("fp16", "int4"):
        for b in (1, 16):
            rows[f"portable_infer {prec} b{b}"] = attempt(ours, pkgs[prec], b)
            rows[f"portable_infer {prec} static KV b{b}"] = attempt(ours, pkgs[prec], b, True)
            log(rows)
    results["correctness"] = attempt(correctness, pkgs)
    for b in (1, 16):
        rows[f"transformers fp16 eager b{b}"] = attempt(transformers_fp16, hf, b)
    if not args.skip_genai:
        for prec in ("fp16", "int4"):
            gdir = work / f"genai-{prec}"
            if not (gdir / "genai_config.json").exists():
                subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o",
                                str(gdir), "-p", prec, "-e", "cuda", "-c", str(work / "genai-cache")],
                               check=False, stdout=sys.stderr)
            for b in (1, 16):
                rows[f"ORT GenAI {prec} b{b}"] = attempt(genai, gdir, b, False)
                rows[f"ORT GenAI {prec} cuda-graph b{b}"] = attempt(genai, gdir, b, True)
                log(rows)
    results["rows"] = rows
    print("| runtime | decode tokens/s | TTFT ms | note |")
    print("|---|---|---|---|")
    for k, v in rows.items():
        tps = f"{v['decode_tok_s']:.0f}" if "decode_tok_s" in v else "fails"
        print(f"| {k} | {tps} | {v.get('ttft_ms', 0):.1f} | {v.get('error', v.get('note', v.get('variant', '')))} |")
    print(json.dumps(results["correctness"]))
    Path(args.out, "gpu_results.json").write_text(json.dumps(results, indent=2))
    shutil.rmtree(work / "genai-cache", ignore_errors=True)


if __name__ == "__main__":
    main()
