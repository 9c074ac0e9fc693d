"""A quick CUDA check of every graph variant on a small llama (minutes less than gpu_bench.py).

    PYTHONPATH=/root/site:$PWD python3 benchmarks/gpu_smoke.py

Exports a 4-layer llama (fp32, fp16, int4; fused and static variants), runs greedy decoding on
CUDA with each variant (static: CUDA graphs) and prints whether the tokens agree with the fp32
CPU run of the fused graph, and the decode rate. Also one GGUF Q4_1 linear layer as the fused
graphs emit it (offsets folded into MatMulNBits) on CUDA against the dequantized float matmul.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    import torch
    import transformers

    import portable_infer
    from exporters.export import export

    work = Path("/tmp/gpusmoke")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=1024, max_position_embeddings=512)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.08 * torch.randn(p.shape)) if p.ndim > 1 else p.add_(0.2 * torch.randn(p.shape))
    model.save_pretrained(work / "hf")
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 1024, n).tolist() for n in (7, 12, 3, 9)]
    ref = None
    try:
        q4_1_linear_check()
    except Exception as exc:
        print(f"Q4_1 linear: FAILED {type(exc).__name__}: {str(exc)[:600]}", flush=True)
    for prec in ("fp32", "fp16", "int4"):
        pkg = export(work / "hf", work / prec, precision=prec, verify=False, overwrite=True,
                     variants=("portable", "fused", "static"))
        if ref is None:
            ref = portable_infer.load(pkg, "cpu").batch_generate_ids(prompts, max_new_tokens=24, ignore_eos=True)
        for variant, static in (("fused", False), ("static", True)):
            try:
                m = portable_infer.load(pkg, "cuda", strict=True, static_kv=static)
                out = m.batch_generate_ids(prompts, max_new_tokens=24, ignore_eos=True)
                t = time.perf_counter()
                for _ in range(3):
                    m.generate_ids(prompts[0], max_new_tokens=64, ignore_eos=True)
                rate = 3 * 64 / (time.perf_counter() - t)
                same = sum(a == b for a, b in zip(out, ref))
                print(f"{prec} {m.variant} on {m.provider} graphs={getattr(m.engine, 'cuda_graph', None)}: "
                      f"{same}/4 rows equal fp32 CPU, ~{rate:.0f} tok/s b1", flush=True)
            except Exception as exc:  # report every variant, not just the first failure
                print(f"{prec} {variant}: FAILED {type(exc).__name__}: {str(exc)[:600]}", flush=True)
        try:
            scheduler_check(pkg, prec, prompts)
        except Exception as exc:
            print(f"{prec} scheduler: FAILED {type(exc).__name__}: {str(exc)[:600]}", flush=True)


def q4_1_linear_check() -> None:
    """The Q4_1 form of the fused graphs (integer zero points, remainder rows over the block sums)
    on CUDA, fp32 and fp16 activations, against x @ dequantized weights."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from _quant import linear_error, q4_1

    rng = np.random.default_rng(1)
    for n_in in (576, 1536):
        w = rng.standard_normal((192, n_in)).astype(np.float32) * 0.05
        x = rng.standard_normal((1, 5, n_in)).astype(np.float32)
        for dtype in (np.float32, np.float16):
            rel, ops = linear_error(q4_1(w), x, 4, "CUDAExecutionProvider", dtype)
            print(f"Q4_1 linear {n_in} in, {np.dtype(dtype).name} on CUDA ({'+'.join(sorted(set(ops)))}): "
                  f"max |diff| {rel:.1e} of max |y|", flush=True)


def scheduler_check(pkg, prec: str, prompts: list, provider: str = "cuda") -> None:
    """Continuous batching on CUDA: requests joining a running batch (chunked prefill, grouped
    prefill, rows leaving) give their single runs' greedy tokens."""
    import portable_infer
    from portable_infer.serving.scheduler import Scheduler, SchedulerConfig

    for static in (False, True):  # growing KV; fixed buffers (+ CUDA graphs where capture works)
        m = portable_infer.load(pkg, provider, strict=True, static_kv=static)
        news = [30, 12, 25, 8]
        ref = [m.generate_ids(p, max_new_tokens=n, ignore_eos=True) for p, n in zip(prompts, news)]
        with Scheduler(m, SchedulerConfig(max_batch=4, prefill_chunk=8)) as sched:
            first = sched.submit(prompts[0], max_new_tokens=news[0], ignore_eos=True)
            head = [first.get(30).token for _ in range(3)]
            rest = [sched.submit(p, max_new_tokens=n, ignore_eos=True) for p, n in zip(prompts[1:], news[1:])]
            outs = [head + [r.token for r in first if r.token is not None]]
            outs += [[r.token for r in h if r.token is not None] for h in rest]
            stats = sched.stats()
        same = sum(a == b for a, b in zip(outs, ref))
        graphs = getattr(m.engine, "cuda_graph", False)
        moves = ", KV rows moved on the device" if static and m.engine.row_mover() is not None else ""
        print(f"{prec} scheduler on {m.provider} ({m.variant}{', CUDA graphs' if graphs else ''}{moves}): {same}/4 "
              f"requests equal their single runs; blocks used at the end {stats.blocks_used}, finished "
              f"{stats.requests_finished}", flush=True)


if __name__ == "__main__":
    main()
