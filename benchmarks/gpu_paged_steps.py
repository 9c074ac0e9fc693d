"""Where a paged decode step's time goes on CUDA: the packed forward at each batch size (the host's
share and the session run's), and ONNX Runtime's profile of its nodes by op type.

    PYTHONPATH=/root/site:$PWD python3 benchmarks/gpu_paged_steps.py PACKAGE [--batches 64 256]
        [--prompt 128] [--mix 256] [--block 16] [--profile-batch 256]

PACKAGE: exported with the paged variant (``--variants static,paged``). Each batch's rows are
prefilled with ``--prompt`` to ``--prompt + --mix`` random ids (a serving level's contexts), then
30 greedy decode steps (one token per row, packed), each timed whole and its session run alone;
medians. Then ``--profile-batch`` rows again in a session with ONNX Runtime's profiler on: the
nodes' time per step by op type (their kernels' wall time as ORT records it). The prefills of
16 rows (``prefill_group_ms``) and decode steps with 16 new ``--prompt``-token prompts packed in
(``mixed_step_ms``: the server's mixed steps) are timed too.

``--graphs``: instead, each batch's decode steps plain and as CUDA graphs (engine/paged_graphs.py:
rows rounded up to a bucket, the graphs made first as the scheduler makes them), on the same
prompts: the step's median wall time each way, and how many rows picked the same greedy tokens
in every step (the graph's attention bounds differ from a plain step's: fp16 sums may differ), and
the largest difference of the first step's logits (the same inputs both ways).
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, ".")
import portable_infer  # noqa: E402

STEPS = 30
MIXED = 4  # mixed steps timed (the first left out)


def decode_steps(engine, batch: int, prompt: int, mix: int, rng, capacity: int) -> dict:
    extra = MIXED * 16 * (-(-prompt // engine.block_size) + 1)  # the mixed steps' new prompts
    engine.reserve(-(-batch * capacity // engine.block_size) + batch + extra, engine.block_size)
    caches = [engine.new_cache(1, capacity=capacity) for _ in range(batch)]
    lengths = np.linspace(prompt, prompt + mix, batch).astype(int)
    groups = []
    for k in range(0, batch, 16):  # prefills of 16 sequences at a time
        t = time.perf_counter()
        engine.forward_packed([(caches[i], 0, rng.integers(3, engine.vocab, int(lengths[i])).tolist())
                               for i in range(k, min(k + 16, batch))], greedy=True)
        groups.append(time.perf_counter() - t)
    run, runs = engine._run, []

    def timed_run(feeds, greedy):
        t = time.perf_counter()
        out = run(feeds, greedy)
        runs.append(time.perf_counter() - t)
        return out

    engine._run = timed_run
    tokens, whole = [[3]] * batch, []
    for _ in range(STEPS + 5):
        t = time.perf_counter()
        _, token = engine.forward_packed([(caches[i], 0, tokens[i]) for i in range(batch)], greedy=True)
        whole.append(time.perf_counter() - t)
        tokens = [[int(x)] for x in token]
    engine._run = run
    mixed = []  # the decode step with a group of 16 new --prompt-token prompts riding in it
    for _ in range(MIXED):
        fresh = [(engine.new_cache(1, capacity=capacity), 0, rng.integers(3, engine.vocab, prompt).tolist())
                 for _ in range(16)]
        t = time.perf_counter()
        _, token = engine.forward_packed([(caches[i], 0, tokens[i]) for i in range(batch)] + fresh, greedy=True)
        mixed.append(time.perf_counter() - t)
        tokens = [[int(x)] for x in token[:batch]]
    w, r = statistics.median(whole[5:]) * 1e3, statistics.median(runs[5:]) * 1e3
    return {"batch": batch, "step_ms": round(w, 2), "run_ms": round(r, 2), "host_ms": round(w - r, 2),
            "tok_s": round(batch / w * 1e3), "prefill_group_ms": round(statistics.median(groups) * 1e3, 1),
            f"mixed_step_ms (+16 x {prompt})": round(statistics.median(mixed[1:]) * 1e3, 1)}


def graphs_vs_plain(engine, batch: int, prompt: int, mix: int, capacity: int) -> dict:
    out, seqs, first = {"batch": batch}, {}, {}
    for mode in ("plain", "graphs"):
        engine.decode_graphs(capture=True)
        if mode == "plain":
            engine.graphs = None
        engine.reserve(-(-batch * capacity // engine.block_size) + batch, engine.block_size)
        t = time.perf_counter()
        made = engine.warm_up(batch) if mode == "graphs" else []
        if made:
            out["warm_up_s"] = round(time.perf_counter() - t, 2)
        rng = np.random.default_rng(batch)  # the same prompts both ways
        caches = [engine.new_cache(1, capacity=capacity) for _ in range(batch)]
        lengths = np.linspace(prompt, prompt + mix, batch).astype(int)
        for k in range(0, batch, 16):
            engine.forward_packed([(caches[i], 0, rng.integers(3, engine.vocab, int(lengths[i])).tolist())
                                   for i in range(k, min(k + 16, batch))], greedy=True)
        tokens, seq, times = [[3]] * batch, [], []
        for k in range(STEPS + 5):
            t = time.perf_counter()
            logits, token = engine.forward_packed([(caches[i], 0, tokens[i]) for i in range(batch)], greedy=k > 0)
            if k == 0:  # the first step's logits, the same inputs both ways
                first[mode] = logits
            times.append(time.perf_counter() - t)
            tokens = [[int(x)] for x in token]
            seq.append(np.asarray(token).copy())
        out[f"{mode}_ms"] = round(statistics.median(times[5:]) * 1e3, 2)
        seqs[mode] = np.array(seq)
        del caches
    g = engine.graphs
    out["captured"] = bool(g.capture and not g.failed)  # capture: on CUDA only
    out["speedup"] = round(out["plain_ms"] / out["graphs_ms"], 3)
    diff = np.abs(first["plain"] - first["graphs"])
    out["first_step_logits_max_diff"] = round(float(diff.max()), 4)
    out["first_step_logits_max_abs"] = round(float(np.abs(first["plain"]).max()), 2)
    out["rows_same_tokens"] = f"{int((seqs['plain'] == seqs['graphs']).all(axis=0).sum())}/{batch}"
    out["steps_same_tokens"] = f"{int((seqs['plain'] == seqs['graphs']).all(axis=1).sum())}/{len(seqs['plain'])}"
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("package")
    ap.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--mix", type=int, default=256)
    ap.add_argument("--block", type=int, default=16)
    ap.add_argument("--profile-batch", type=int, default=256)
    ap.add_argument("--provider", default="cuda")
    ap.add_argument("--graphs", action="store_true", help="decode steps plain against CUDA graphs (see above)")
    args = ap.parse_args()
    rng = np.random.default_rng(20261204)
    capacity = args.prompt + args.mix + STEPS + MIXED + 16
    model = portable_infer.load(args.package, args.provider, paged_kv=True, strict=True)
    model.engine.block_size = args.block
    print(f"paged decode steps ({model.provider}, block {args.block}, contexts {args.prompt}..{args.prompt + args.mix}):")
    if args.graphs:
        if model.engine.graphs is None:
            print("the session did not take CUDA graph capture: no graphs to compare")
        for b in args.batches:
            print(json.dumps(graphs_vs_plain(model.engine, b, args.prompt, args.mix, capacity)), flush=True)
        return
    model.engine.graphs = None  # the plain steps (the graphs' are --graphs)
    for b in args.batches:
        print(json.dumps(decode_steps(model.engine, b, args.prompt, args.mix, rng, capacity)))
    if not args.profile_batch:
        return
    import onnxruntime as ort

    from portable_infer.engine.paged import PagedEngine

    so = ort.SessionOptions()
    so.enable_profiling = True
    so.profile_file_prefix = "/tmp/paged_profile"
    v = model.manifest.variant("paged")
    session = ort.InferenceSession(str(model.path / v.file), so, providers=[model.provider])
    engine = PagedEngine(session, v, model.provider, ort, max_context=model.max_context,
                         vocab_size=model.manifest.model.vocab_size, block_size=args.block)
    del model
    decode_steps(engine, args.profile_batch, args.prompt, args.mix, rng, capacity)
    trace = json.load(open(session.end_profiling()))
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in trace if e.get("name") == "model_run")[-STEPS:]
    by_op, run_ms = collections.defaultdict(float), sum(b - a for a, b in runs) / 1e3 / len(runs)
    for e in trace:  # the decode steps' nodes only (the last STEPS runs; the prefills come first)
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and \
                any(a <= e["ts"] <= b for a, b in runs):
            by_op[e["args"].get("op_name", "?")] += e["dur"] / 1e3 / len(runs)
    print(f"\nnode time by op type, decode steps of batch {args.profile_batch} (ms a step; the profiled run "
          f"took {run_ms:.2f} ms):")
    for op, ms in sorted(by_op.items(), key=lambda kv: -kv[1])[:12]:
        print(f"  {op:32s} {ms:7.2f}")


if __name__ == "__main__":
    main()
