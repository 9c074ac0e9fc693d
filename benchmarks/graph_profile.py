"""Where a decode step's time goes, op type by op type: our package graphs against ONNX Runtime
GenAI's, in one process, through ONNX Runtime alone (no decode loop).

    .venv/bin/python benchmarks/graph_profile.py --ours .bench/packages/smollm2:static-q4 \\
        --ours .bench/packages/smollm2:static-int8 --genai .bench/models/ortgenai-int4 \\
        [--graph LABEL=FOLDER:VARIANT ...] [--past 128] [--capacity 256] [--threads 2] \\
        [--rounds 9] [--steps 10] [--warmup-s 0.25] [--profile-steps 20] [--top 12] [--structure] [--config K=V]

Every graph runs one decode step at batch 1: one new token after ``--past`` random KV rows,
through an IO binding made once (what our static engine does). Growing graphs get past buffers of
``--past`` rows and a mask of ``--past + 1``; graphs that write their KV in place (our ``static``
variants, GenAI with ``past_present_share_buffer``) get buffers of ``--capacity`` rows bound as
both past and present, and a mask of that width with ``--past + 1`` ones.

First each graph's logits against the first graph's, on the same random KV where the shapes
match: a patch that should be exact (``graph_patch.py split-gate-up``) must show 0 there; random
KV is far from a real state, so other differences say little. Then two phases, the graphs taking
turns in a new shuffled order each round, so that the machine's noise hits them alike:

1. plain step time: ``--rounds`` rounds of ``--steps`` steps per graph, each turn after
   ``--warmup-s`` of untimed steps; median and min wall ms,
   median process CPU ms, and the median over rounds of each round's ratio to the first graph
   (wall and CPU). On a busy machine compare those ratios, at ``--threads 1`` the CPU one,
   and give the first graph again as a control (``--graph control=SAME:VARIANT``): its ratio is
   the run's noise (session 17: 0.92x-0.99x for the very same graph on the 2-CPU EPYC);
2. ONNX Runtime's profiler (``enable_profiling``) on fresh sessions: ``--profile-steps`` steps
   per graph after a warm-up; per op type and per MatMul shape (K x N) the nodes per step and
   µs per step, summed over the nodes of each node's median and, in a second table, of each
   node's minimum over the steps (what a node costs when nothing got in its way), and the
   ``--top`` slowest nodes. Profiling adds overhead: phase 1's times are the step times.

``--structure`` also prints each graph's make-up: inputs, op counts, the MatMulNBits forms
(K, N, bits, block size, accuracy level, zero points, g_idx, bias), attention and rotary
attributes, casts, and the node list of the first decoder layer (``graph_structure.py``).
A ``--graph`` or ``--ours`` folder may be a patched copy written by ``graph_patch.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TOKEN = 5  # the new token's id: any id in every vocabulary
GENAI_CONFIG = "genai_config.json"


@dataclass(frozen=True)
class StepGraph:
    """One decode graph and what its step needs: names, KV shapes, whether KV is written in place."""

    label: str
    path: Path
    kv: tuple  # ((past_key, past_value, present_key, present_value), ...) per layer
    kv_heads: int
    head_dim: int
    kv_dtype: str
    in_place: bool  # present is written into the past buffers (static KV / GQA share buffer)
    logits: str = "logits"


def ours(folder: Path, variant: str, label: str | None = None) -> StepGraph:
    """A variant of one of our packages, from its manifest.json (plain JSON: the contract)."""
    manifest = json.loads((folder / "manifest.json").read_text())
    by_name = {v["name"]: v for v in manifest["variants"]}
    if variant not in by_name:
        raise SystemExit(f"{folder} has no variant {variant!r}; it has {sorted(by_name)}")
    v = by_name[variant]
    kv = v["kv"]
    pairs = tuple((pk, pv, ok, ov) for (pk, pv), (ok, ov) in zip(kv["past"], kv["present"]))
    return StepGraph(label or f"ours {variant}", folder / v["file"], pairs, kv["num_kv_heads"],
                     kv["head_dim"], kv["dtype"], kv["growth"] == "static")


def genai(folder: Path, label: str | None = None) -> StepGraph:
    """ONNX Runtime GenAI's decoder, from its genai_config.json."""
    config = json.loads((folder / GENAI_CONFIG).read_text())
    dec = config["model"]["decoder"]
    ins, outs = dec["inputs"], dec["outputs"]
    pairs = tuple((ins["past_key_names"] % i, ins["past_value_names"] % i,
                   outs["present_key_names"] % i, outs["present_value_names"] % i)
                  for i in range(dec["num_hidden_layers"]))
    share = bool(config.get("search", {}).get("past_present_share_buffer", False))
    return StepGraph(label or "GenAI", folder / dec["filename"], pairs, dec["num_key_value_heads"],
                     dec["head_size"], "float32", share, outs.get("logits", "logits"))


def parse_graph(spec: str, kind: str) -> StepGraph:
    """``FOLDER:VARIANT`` (ours), ``FOLDER`` (GenAI) or, for --graph, ``LABEL=FOLDER[:VARIANT]``."""
    label = None
    if kind == "graph":
        label, _, spec = spec.partition("=")
    folder, _, variant = spec.partition(":")
    if (Path(folder) / GENAI_CONFIG).is_file() and not variant:
        return genai(Path(folder), label)
    if not variant:
        raise SystemExit(f"{spec}: name the variant, FOLDER:VARIANT")
    return ours(Path(folder), variant, label)


def session(graph: StepGraph, threads: int, config: list, profile_prefix: str | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    for kv in config:
        key, value = kv.split("=", 1)
        so.add_session_config_entry(key, value)
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    return ort.InferenceSession(str(graph.path), so, providers=["CPUExecutionProvider"])


def _input_value(inp, graph: StepGraph, past: int, width: int):
    """The value of one graph input other than the past KV (bound separately) for the step."""
    dtype = {"tensor(int64)": np.int64, "tensor(int32)": np.int32}.get(inp.type)
    if inp.name == "input_ids":
        return np.array([[TOKEN]], dtype)
    if inp.name == "attention_mask":
        return (np.arange(width) < past + 1).astype(dtype)[None]
    if inp.name == "position_ids":
        return np.array([[past]], dtype)
    if inp.name == "total_sequence_length":  # our static engine binds the mask's width
        return np.array(width, np.int32)
    raise SystemExit(f"{graph.label}: input {inp.name!r} ({inp.type}) is not one a decode step feeds")


def binding(sess, graph: StepGraph, past: int, capacity: int, rng):
    """An IO binding for the step, made once; returns (binding, the values it holds: logits last)."""
    import onnxruntime as ort

    width = capacity if graph.in_place else past + 1
    kv_rows = capacity if graph.in_place else past
    past_names = {n for row in graph.kv for n in row[:2]}
    b, keep = sess.io_binding(), []
    for inp in sess.get_inputs():
        if inp.name in past_names:
            continue
        value = _input_value(inp, graph, past, width)
        keep.append(value)
        b.bind_cpu_input(inp.name, value)
    shape = (1, graph.kv_heads, kv_rows, graph.head_dim)
    for pk, pv, ok, ov in graph.kv:
        for past_name, present_name in ((pk, ok), (pv, ov)):
            value = ort.OrtValue.ortvalue_from_numpy(rng.standard_normal(shape).astype(graph.kv_dtype))
            keep.append(value)
            b.bind_ortvalue_input(past_name, value)
            if graph.in_place:
                b.bind_ortvalue_output(present_name, value)
            else:
                b.bind_output(present_name, "cpu")
    vocab = next(o.shape[-1] for o in sess.get_outputs() if o.name == graph.logits)
    logits = ort.OrtValue.ortvalue_from_numpy(np.zeros((1, 1, vocab), np.float32))
    b.bind_ortvalue_output(graph.logits, logits)
    return b, keep + [logits]


def prepared(graphs, args, profile_dir: str | None = None):
    """[(graph, session, binding, kept arrays)] with three warm-up steps each."""
    rows = []
    for i, g in enumerate(graphs):
        prefix = os.path.join(profile_dir, f"g{i}") if profile_dir else None
        s = session(g, args.threads, args.config, prefix)
        b, keep = binding(s, g, args.past, args.capacity, np.random.default_rng(args.seed))
        for _ in range(3):
            s.run_with_iobinding(b)
        rows.append((g, s, b, keep))
    return rows


def logits_check(rows) -> None:
    """Each graph's logits against the first graph's on the same inputs (same KV where the KV
    shapes match): an exact patch shows 0."""
    first = None
    print("\n| graph | max abs logit | max abs diff vs first | same argmax |\n|---|---:|---:|---|")
    for g, _, _, keep in rows:
        logits = keep[-1].numpy().reshape(-1)
        if first is None:
            first = logits
        print(f"| {g.label} | {np.abs(logits).max():.2f} | {np.abs(logits - first).max():.4f} | "
              f"{int(logits.argmax()) == int(first.argmax())} |")


def step_times(graphs, args) -> tuple:
    """Phase 1: ms per step, the graphs taking turns in a shuffled order: ({label: [wall ms per
    round]}, {label: [process CPU ms per round]}). At one thread the CPU time is what a busy
    machine disturbs least. Each turn first runs untimed steps for ``--warmup-s``: a session's
    first steps after another one ran are up to 2x slower on a 2-core host (the other's threads
    still spin), which timed every graph partly cold (session 24)."""
    rows = prepared(graphs, args)
    logits_check(rows)
    wall, cpu = defaultdict(list), defaultdict(list)
    order = np.random.default_rng(args.seed)
    for _ in range(args.rounds):
        for i in order.permutation(len(rows)):  # a new order each round: no graph always follows another
            g, s, b, _ = rows[i]
            warm = time.perf_counter()
            while time.perf_counter() - warm < args.warmup_s:
                s.run_with_iobinding(b)
            t, c = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                s.run_with_iobinding(b)
            wall[g.label].append((time.perf_counter() - t) / args.steps * 1e3)
            cpu[g.label].append((time.process_time() - c) / args.steps * 1e3)
    return wall, cpu


def profiles(graphs, args) -> dict:
    """Phase 2: each graph's profiler events of its last ``--profile-steps`` runs."""
    with tempfile.TemporaryDirectory() as tmp:
        rows = prepared(graphs, args, tmp)
        order = np.random.default_rng(args.seed)
        for _ in range(args.profile_steps):
            for i in order.permutation(len(rows)):
                rows[i][1].run_with_iobinding(rows[i][2])
        out = {}
        for g, s, _, _ in rows:
            events = json.loads(Path(s.end_profiling()).read_text())
            out[g.label] = last_runs(events, args.profile_steps)
    return out


def last_runs(events: list, runs: int) -> list:
    """The kernel events inside the last ``runs`` model_run windows (warm-up runs left out)."""
    windows = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                     if e.get("cat") == "Session" and e.get("name") == "model_run")[-runs:]
    kernels = [e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]
    return [e for e in kernels if any(lo <= e["ts"] <= hi for lo, hi in windows)]


def node_stats(kernels: list) -> dict:
    """{node name: (op type, median µs, min µs over the profiled steps, "K x N" of a MatMul-like
    node or "")}: per node, so a step in which another process took the core does not count for
    all of it; the minimum is the node's time when nothing got in its way (on a busy machine the
    better guide for short kernels)."""
    durations, info = defaultdict(list), {}
    for e in kernels:
        name = e["name"][: -len("_kernel_time")]
        durations[name].append(e["dur"])
        info[name] = (e["args"].get("op_name", "?"), _kn(e["args"]))
    return {name: (info[name][0], statistics.median(d), min(d), info[name][1])
            for name, d in durations.items()}


def _kn(args: dict) -> str:
    """"K x N" from a MatMul-like node's first input and output shapes."""
    if "MatMul" not in args.get("op_name", ""):
        return ""
    try:
        k = list(args["input_type_shape"][0].values())[0][-1]
        n = list(args["output_type_shape"][0].values())[0][-1]
    except (KeyError, IndexError):
        return "?"
    return f"{k} x {n}"


def by_shape(nodes: dict, which: int) -> dict:
    """{"op K x N": (nodes per step, µs per step)} of the MatMul-like nodes."""
    out = defaultdict(lambda: [0, 0.0])
    for op, med, low, kn in nodes.values():
        if kn:
            out[f"{op} {kn}"][0] += 1
            out[f"{op} {kn}"][1] += (med, low)[which - 1]
    return {k: tuple(v) for k, v in out.items()}


def by_op(nodes: dict, which: int = 1) -> dict:
    """{op type: (nodes per step, µs per step)} from ``node_stats`` (``which``: 1 median, 2 min)."""
    count, total = defaultdict(int), defaultdict(float)
    for stats in nodes.values():
        count[stats[0]] += 1
        total[stats[0]] += stats[which]
    return {op: (count[op], total[op]) for op in total}


def top_nodes(nodes: dict, n: int) -> list:
    """[(median µs, min µs, op type, node name)] of the ``n`` slowest nodes by median."""
    return sorted(((med, low, op, name) for name, (op, med, low, _) in nodes.items()), reverse=True)[:n]


def op_table(per_graph: dict, key: str = "op type") -> str:
    """Markdown: one row per op type (or other key), per graph nodes/step, µs/step and share of
    the rows' total."""
    labels = list(per_graph)
    ops = sorted({op for t in per_graph.values() for op in t},
                 key=lambda op: -max(t.get(op, (0, 0))[1] for t in per_graph.values()))
    sums = {lb: sum(us for _, us in t.values()) for lb, t in per_graph.items()}
    lines = [f"| {key} | " + " | ".join(f"{lb}: n | µs | %" for lb in labels) + " |",
             "|---|" + "---:|---:|---:|" * len(labels)]
    for op in ops:
        cells = []
        for lb in labels:
            n, us = per_graph[lb].get(op, (0, 0.0))
            cells.append(f"{n:g} | {us:.0f} | {100 * us / sums[lb]:.1f}" if n else "- | - | -")
        lines.append(f"| {op} | " + " | ".join(cells) + " |")
    lines.append("| **sum** | " + " | ".join(f" | {sums[lb]:.0f} | " for lb in labels) + " |")
    return "\n".join(lines)


def paired(times: list, base: list) -> float:
    """The median over rounds of each round's ratio to the first graph's time in that round: the
    load of the moment cancels out of a ratio of neighbouring measurements."""
    return statistics.median(t / b for t, b in zip(times, base))


def report(graphs, args) -> None:
    times, cpu = step_times(graphs, args)
    print(f"\n## Step time (no profiler): batch 1, past {args.past}, capacity {args.capacity} "
          f"for in-place graphs, {args.threads} threads, {args.rounds} rounds x {args.steps} steps\n")
    first = graphs[0].label
    print("| graph | file | ms/step median | min | vs first (wall) | CPU ms/step median | vs first (CPU) |\n"
          "|---|---|---:|---:|---:|---:|---:|")
    for g in graphs:
        w, c = times[g.label], cpu[g.label]
        print(f"| {g.label} | {g.path} | {statistics.median(w):.2f} | {min(w):.2f} | "
              f"{paired(w, times[first]):.3f}x | {statistics.median(c):.2f} | {paired(c, cpu[first]):.3f}x |")
    events = profiles(graphs, args)
    nodes = {lb: node_stats(k) for lb, k in events.items()}
    for which, what in ((1, "each node's median over the steps"), (2, "each node's minimum over the steps")):
        print(f"\n## Kernel time per op type (profiler, {args.profile_steps} steps each; n = nodes per step, "
              f"µs per step as the sum of {what}, % of the step's kernel time)\n")
        print(op_table({lb: by_op(nd, which) for lb, nd in nodes.items()}))
        print(f"\nThe MatMul-like nodes by shape (input width K x output width N), {what}:\n")
        print(op_table({lb: by_shape(nd, which) for lb, nd in nodes.items()}, "op K x N"))
    for lb, nd in nodes.items():
        print(f"\n### {lb}: the {args.top} slowest nodes (median and min µs per step)\n")
        for med, low, op, name in top_nodes(nd, args.top):
            print(f"- {med:8.0f} {low:8.0f}  {op:34s} {name}")


def host_line() -> str:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from compare_cpu import host_line as cpu_line

    return cpu_line()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ours", action="append", default=[], metavar="FOLDER:VARIANT")
    ap.add_argument("--genai", action="append", default=[], metavar="FOLDER")
    ap.add_argument("--graph", action="append", default=[], metavar="LABEL=FOLDER[:VARIANT]")
    ap.add_argument("--past", type=int, default=128)
    ap.add_argument("--capacity", type=int, default=256, help="KV rows of in-place graphs (> past)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup-s", type=float, default=0.25,
                    help="untimed steps for this long at each turn, before its timed ones")
    ap.add_argument("--profile-steps", type=int, default=20)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--config", action="append", default=[], metavar="KEY=VALUE",
                    help="session config entry for every graph (e.g. session.intra_op.allow_spinning=0)")
    ap.add_argument("--structure", action="store_true", help="also print each graph's make-up")
    args = ap.parse_args()
    if args.capacity <= args.past:
        ap.error("--capacity must exceed --past")
    graphs = ([parse_graph(s, "ours") for s in args.ours] + [parse_graph(s, "genai") for s in args.genai]
              + [parse_graph(s, "graph") for s in args.graph])
    if not graphs:
        ap.error("give at least one graph (--ours, --genai or --graph)")
    import onnxruntime as ort

    print(f"{host_line()}\nONNX Runtime {ort.__version__}; load average {os.getloadavg()}")
    if args.structure:
        import graph_structure

        for g in graphs:
            print(graph_structure.describe(g.label, g.path))
    report(graphs, args)
    print(f"\nload average at the end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
