"""Sampled rows drawn on the device (``graphs/sample.onnx``) against the host's draw, at Llama-3's
vocabulary (issue #21 item 1): time per step and agreement, in one run.

    PYTHONPATH=/root/site:$PWD python3 benchmarks/gpu_sample.py --out $OUT [--rows 64 256] [--vocab 128256]

For each batch size, logit scale (1: flat rows, most of the vocabulary in top-p's set; 4: peaked
rows) and filter setting: the median of ``--repeat`` device draws of every row (the uniform
numbers up, token ids back; the rows' logits stay on the device), and the host's way for the same
rows (the logits [rows, vocab] brought over, then ``make_sampler`` row by row, as host mode does).
``agree``: the device's tokens equal to the host's with the same uniform numbers (they may differ
only where a number lands within float rounding of a boundary). ``reruns``: rows whose kept set
lay past the 1,024 sorted candidates and ran again with the vocabulary sorted.
Random logits (seed printed); values do not change the time but for the reruns.
``--provider cpu`` is a dry run on the CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

SEED = 20261204
FILTERS = {"temp 0.7": dict(temperature=0.7), "top-k 50": dict(temperature=0.7, top_k=50),
           "top-p 0.9": dict(temperature=0.7, top_p=0.9),
           "k 50 p 0.9 min-p 0.05": dict(temperature=0.7, top_k=50, top_p=0.9, min_p=0.05)}


class _Session:
    """What the companion sessions read of a model session."""

    def __init__(self, provider):
        self.provider = provider

    def get_providers(self):
        return [self.provider, "CPUExecutionProvider"]

    def get_provider_options(self):
        return {}


def _median_ms(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def _ops(ort, provider: str, device: str, args, rng) -> None:
    """Single ops of the graph's kinds on [rows, vocab]-sized inputs, timed alone (ONNX Runtime's
    profiler shows launch times, not the device's): which kernel the device spends the draw in."""
    from onnx import TensorProto, helper

    rows, vocab = args.ops, args.vocab
    f32, f64, i64 = TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.INT64
    cases = {  # name: (op, input dtype, shape, attrs, extra const inputs)
        "ReduceSum int64 [n, V] axis 1": ("ReduceSum", i64, [rows, vocab], {}, [np.array([1], np.int64)]),
        "ReduceSum float [n, V] axis 1": ("ReduceSum", f32, [rows, vocab], {}, [np.array([1], np.int64)]),
        "ReduceMax int64 [n, 512] axis 1": ("ReduceMax", i64, [rows, 512], {}, [np.array([1], np.int64)]),
        "ReduceSum double [n, V/256, 256] axis 2": ("ReduceSum", f64, [rows, vocab // 256, 256], {},
                                                    [np.array([2], np.int64)]),
        "CumSum double [n, V/256]": ("CumSum", f64, [rows, vocab // 256], {}, [np.array(1, np.int64)]),
        "CumSum float [n, 4, 256] axis 2": ("CumSum", f32, [rows, 4, 256], {}, [np.array(2, np.int64)]),
        "Cast float->double [n, V]": ("Cast", f32, [rows, vocab], {"to": f64}, []),
        "Div float [n, V]": ("Div", f32, [rows, vocab], {}, [np.full((rows, 1), 0.7, np.float32)]),
        "TopK k=1 float [n, V]": ("TopK", f32, [rows, vocab], {"axis": 1}, [np.array([1], np.int64)]),
        "TopK k=64 float [n, V]": ("TopK", f32, [rows, vocab], {"axis": 1}, [np.array([64], np.int64)]),
        "TopK k=1024 float [n, V]": ("TopK", f32, [rows, vocab], {"axis": 1}, [np.array([1024], np.int64)]),
        "TopK k=V float [n, V]": ("TopK", f32, [rows, vocab], {"axis": 1}, [np.array([vocab], np.int64)]),
        "ArgMax float [n, V]": ("ArgMax", f32, [rows, vocab], {"axis": 1}, []),
        "ReduceMax float [n, V] axis 1": ("ReduceMax", f32, [rows, vocab], {}, [np.array([1], np.int64)]),
        "Gather float [n, V] rows axis 0": ("Gather", f32, [rows, vocab], {"axis": 0},
                                            [np.arange(rows, dtype=np.int64)]),
        "IsNaN float [n, V]": ("IsNaN", f32, [rows, vocab], {}, []),
        "Exp float [n, V]": ("Exp", f32, [rows, vocab], {}, []),
        "ScatterElements [n, V] <- [n, 1024]": ("ScatterElements", f32, [rows, vocab], {"axis": 1},
                                                [np.tile(np.arange(1024, dtype=np.int64), (rows, 1)),
                                                 np.ones((rows, 1024), np.float32)]),
        "GatherElements double [n, V/256, 256] [n, 1, 256]": ("GatherElements", f64, [rows, vocab // 256, 256],
                                                              {"axis": 1}, [np.zeros((rows, 1, 256), np.int64)]),
        "Pad double [n, V] by 0": ("Pad", f64, [rows, vocab], {}, [np.zeros(4, np.int64)]),
    }
    from onnx import numpy_helper
    for name, (op, dtype, shape, attrs, extra) in cases.items():
        consts = [numpy_helper.from_array(a, f"c{i}") for i, a in enumerate(extra)]
        outs = ["y", "i"] if op == "TopK" else ["y"]
        node = helper.make_node(op, ["x"] + [c.name for c in consts], outs, **attrs)
        graph = helper.make_graph([node], "op", [helper.make_tensor_value_info("x", dtype, shape)],
                                  [helper.make_empty_tensor_value_info(o) for o in outs], consts)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
        model.ir_version = 8
        sess = ort.InferenceSession(model.SerializeToString(), providers=[provider])
        host = {f32: np.float32, f64: np.float64, i64: np.int64}[dtype]
        x = ort.OrtValue.ortvalue_from_numpy(rng.integers(0, 3, shape).astype(host), device, 0)
        b = sess.io_binding()
        b.bind_ortvalue_input("x", x)
        for o in outs:
            b.bind_output(o, device)
        ms = _median_ms(lambda: (sess.run_with_iobinding(b), b.synchronize_outputs()), args.repeat)
        print(f"  {name:44} {ms:8.3f} ms", flush=True)


def _prefixes(ort, provider: str, device: str, args, rng) -> None:
    """The graph cut after every few nodes, each prefix timed on the device (top-p rows, peaked
    logits): where the device's time goes, where the profiler shows only launches."""
    import onnx

    from portable_infer.decode.sampling import SamplingParams, draw_filters
    from portable_infer.engine.companion import GRAPHS

    rows = args.prefixes
    model = onnx.load(str(GRAPHS / "sample.onnx"))
    logits = ort.OrtValue.ortvalue_from_numpy(
        (rng.standard_normal((rows, args.vocab)) * 4).astype(np.float32), device, 0)
    filters = draw_filters([SamplingParams(temperature=0.7, top_p=0.9)] * rows)
    feeds = dict(rows=np.arange(rows), u=rng.random(rows), k=np.array([1024], np.int64), **filters)
    nodes = model.graph.node
    for cut in args.cuts or list(range(4, len(nodes), 6)) + [len(nodes)]:
        m = onnx.ModelProto()
        m.CopyFrom(model)
        del m.graph.node[cut:]
        del m.graph.output[:]
        last = m.graph.node[-1]
        m.graph.output.extend([onnx.helper.make_empty_tensor_value_info(last.output[0])])
        so = ort.SessionOptions()
        so.log_severity_level = 3
        sess = ort.InferenceSession(m.SerializeToString(), so, providers=[provider, "CPUExecutionProvider"])
        names = {i.name for i in sess.get_inputs()}
        b = sess.io_binding()
        if "logits" in names:
            b.bind_ortvalue_input("logits", logits)
        for k, v in feeds.items():
            if k in names:
                b.bind_cpu_input(k, np.ascontiguousarray(v))
        b.bind_output(last.output[0], device)
        ms = _median_ms(lambda: (sess.run_with_iobinding(b), b.synchronize_outputs()), args.repeat)
        print(f"  first {cut:3} nodes (last {last.op_type} {last.output[0]}): {ms:8.3f} ms", flush=True)


def _profile(ort, sampler, provider: str, device: str, args, rng) -> None:
    """The graph's nodes by time (ONNX Runtime's profiler) at ``--profile`` rows, per filter setting."""
    import json
    from collections import defaultdict

    from portable_infer.decode.sampling import SamplingParams, draw_filters
    from portable_infer.engine.companion import GRAPHS
    from portable_infer.engine.device_logits import DeviceLogits

    rows = args.profile
    value = ort.OrtValue.ortvalue_from_numpy(
        (rng.standard_normal((rows, 1, args.vocab)) * 4).astype(np.float32), device, 0)
    for name, kw in FILTERS.items():
        so = ort.SessionOptions()
        so.enable_profiling = True
        so.profile_file_prefix = str(args.out / f"sample_profile_{name.replace(' ', '_')}")
        so.log_severity_level = 3
        sampler.session = ort.InferenceSession(str(GRAPHS / "sample.onnx"), so, providers=[provider, "CPUExecutionProvider"])
        out = DeviceLogits(value, None, sampler=lambda: sampler)
        filters, u = draw_filters([SamplingParams(**kw)] * rows), rng.random(rows)
        for _ in range(3):
            out.sample(np.arange(rows), filters, u)
        t = time.perf_counter()
        for _ in range(5):
            out.sample(np.arange(rows), filters, u)
        wall = (time.perf_counter() - t) / 5 * 1e3
        events = json.load(open(sampler.session.end_profiling()))
        by_node, runs = defaultdict(float), []
        for e in events:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                a = e.get("args", {})
                by_node[(a.get("op_name"), a.get("provider"), e["name"][:-12])] += e["dur"] / 1e3
            elif e.get("name") == "model_run":
                runs.append(e["dur"] / 1e3)
        n_runs = len(runs)  # the node times add up every run, warm-up too
        runs = runs[3:] or runs
        print(f"## {rows} rows, {name}: wall {wall:.2f} ms a draw, model_run median {statistics.median(runs):.2f} ms",
              flush=True)
        total = sum(by_node.values())
        for (op, prov, node), ms in sorted(by_node.items(), key=lambda kv: -kv[1])[:12]:
            print(f"  {op:18} {prov:24} {node:28} {ms / n_runs:7.3f} ms/run ({ms / total:5.1%})", flush=True)


def main() -> None:
    import onnxruntime as ort

    from portable_infer.decode.sampling import SamplingParams, draw_filters, make_sampler
    from portable_infer.engine.device_logits import DeviceLogits
    from portable_infer.engine.device_sample import DeviceSampler

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--rows", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--scales", type=float, nargs="+", default=[1.0, 4.0])
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--host-rows", type=int, default=32, help="rows the host draws are timed on (scaled up)")
    ap.add_argument("--provider", default="cuda")
    ap.add_argument("--prefixes", type=int, default=0, help="rows: time the graph cut after every few nodes")
    ap.add_argument("--cuts", type=int, nargs="*", default=None, help="with --prefixes: these node counts")
    ap.add_argument("--ops", type=int, default=0, help="rows: time single ops of the graph's kinds at that batch")
    ap.add_argument("--profile", type=int, default=0,
                    help="rows: ONNX Runtime's profile of the graph's nodes at that batch (top nodes by time)")
    args = ap.parse_args()
    provider = {"cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}[args.provider]
    device = "cuda" if args.provider == "cuda" else "cpu"
    rng = np.random.default_rng(SEED)
    print(f"seed {SEED}; ONNX Runtime {ort.__version__} on {provider}", flush=True)
    sampler = DeviceSampler(_Session(provider), ort, provider)
    if args.prefixes:
        _prefixes(ort, provider, device, args, rng)
        return
    if args.ops:
        _ops(ort, provider, device, args, rng)
        return
    if args.profile:
        _profile(ort, sampler, provider, device, args, rng)
        return
    lines = ["| rows | logit scale | filters | device ms / step | host ms / step (est.) | agree | reruns |",
             "|---|---|---|---|---|---|---|"]
    for rows in args.rows:
        for scale in args.scales:
            host_logits = (rng.standard_normal((rows, 1, args.vocab)) * scale).astype(np.float32)
            value = ort.OrtValue.ortvalue_from_numpy(host_logits, device, 0)
            out = DeviceLogits(value, None, sampler=lambda: sampler)
            for name, kw in FILTERS.items():
                params = [SamplingParams(**kw)] * rows
                filters, u = draw_filters(params), rng.random(rows)
                every = np.arange(rows)
                before = sampler.reruns
                tokens = out.sample(every, filters, u)
                reruns = sampler.reruns - before
                device_ms = _median_ms(lambda: out.sample(every, filters, u), args.repeat)
                sampler_fn, n = make_sampler(params[0]), min(args.host_rows, rows)

                class Fixed:
                    def __init__(self, x):
                        self.x = x

                    def random(self):
                        return self.x

                def host():
                    x = value.numpy()  # the logits over, as host mode brings them
                    return [sampler_fn(x[i, 0], Fixed(u[i])) for i in range(n)]

                host_ms = _median_ms(host, max(3, args.repeat // 3))
                fetch_ms = _median_ms(lambda: value.numpy(), 3)
                host_est = fetch_ms + (host_ms - fetch_ms) * rows / n
                want = host()
                agree = int(sum(int(t) == w for t, w in zip(tokens[:n], want)))
                line = f"| {rows} | {scale:g} | {name} | {device_ms:.2f} | {host_est:.1f} | {agree}/{n} | {reruns} |"
                print(line, flush=True)
                lines.append(line)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_sample.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
