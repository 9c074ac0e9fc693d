"""Probe: int8 activations made exact by a second int8 pass over their rounding residual.

    .venv/bin/python benchmarks/residual_int8.py [PKG] [--stages 2] [--tokens 300] [--batch 16]

MatMulNBits at accuracy 4 rounds each block of 32 activations to int8 (scale = amax / 127) and is
2-3x faster than its float kernel for one row, but that rounding costs SmolLM2 about 3 % of its
greedy tokens. The residual of that rounding can ride as a second row of the same call:

    x --Reshape [.., K/32, 32]--> xb --Abs, ReduceMax--> amax --127/max(amax, tiny)--> inv
    e = (xb*inv - Round(xb*inv)) / inv            (x minus what the kernel will round x to)
    y = Split(MatMulNBits(Concat([x, e], axis 0)))  ->  y0 + y1 = W·x up to int8(e)'s rounding

so one extra row (three stages: two) gives nearly float results from the int8 kernel. First, on one
576x3072 MatMulNBits node (weights in cache): the error of 1, 2 and 3 stages against the float
kernel, and the time of one float row against two int8 rows. Then the package's static-int8 graph is
rewritten that way (a temporary package of hard links, nothing in PKG changes) and measured in one
process: top-1 agreement with the exact static graph over ``--tokens`` teacher-forced positions of
README.md, and tok/s at batch 1 and ``--batch`` against the exact and plain int8 graphs. Session 6's
finding: exact agreement, no speed gain (13 extra nodes per matmul cost what the kernel saves), so
the exporter does not emit it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import portable_infer  # noqa: E402
from portable_infer.package import manifest as mf  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def rewrite(graph: onnx.GraphProto, stages: int, vocab: int) -> int:
    """Give every 4-bit-layer MatMulNBits at accuracy 4 (not the lm_head) ``stages - 1`` residual rows."""
    consts = {"res_shape4": np.array([0, 0, -1, 32], np.int64), "res_axes": np.array([-1], np.int64),
              "res_tiny": np.float32(1e-30), "res_127": np.float32(127)}
    graph.initializer.extend(numpy_helper.from_array(np.asarray(v), k) for k, v in consts.items())
    nodes, count, shapes = [], 0, set()
    for n in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        if n.op_type != "MatMulNBits" or attrs.get("accuracy_level") != 4 or attrs["N"] == vocab:
            nodes.append(n)
            continue
        p, k = f"res{count}", attrs["K"]
        count += 1
        shape3 = f"res_shape3_{k}"
        if shape3 not in shapes:
            shapes.add(shape3)
            graph.initializer.append(numpy_helper.from_array(np.array([0, 0, k], np.int64), shape3))
        parts, cur = [n.input[0]], n.input[0]
        for s in range(stages - 1):
            q = f"{p}_{s}_"
            ops = [("Reshape", [cur, "res_shape4"], "xb", {}), ("Abs", [q + "xb"], "abs", {}),
                   ("ReduceMax", [q + "abs", "res_axes"], "amax", {"keepdims": 1}),
                   ("Max", [q + "amax", "res_tiny"], "amax1", {}), ("Div", ["res_127", q + "amax1"], "inv", {}),
                   ("Mul", [q + "xb", q + "inv"], "t", {}), ("Round", [q + "t"], "r", {}),
                   ("Sub", [q + "t", q + "r"], "f", {}), ("Div", [q + "f", q + "inv"], "e4", {}),
                   ("Reshape", [q + "e4", shape3], "e", {})]
            nodes += [helper.make_node(op, ins, [q + out], **kw) for op, ins, out, kw in ops]
            parts.append(q + "e")
            cur = q + "e"
        out = n.output[0]
        nodes.append(helper.make_node("Concat", parts, [p + "cat"], axis=0))
        n.input[0], n.output[0] = p + "cat", p + "y"
        nodes.append(n)
        ys = [f"{p}y{i}" for i in range(stages)]
        nodes.append(helper.make_node("Split", [p + "y"], ys, axis=0, num_outputs=stages))
        acc = ys[0]
        for i in range(1, stages):
            nxt = out if i == stages - 1 else f"{p}acc{i}"
            nodes.append(helper.make_node("Add", [acc, ys[i]], [nxt]))
            acc = nxt
    del graph.node[:]
    graph.node.extend(nodes)
    return count


def residual(x: np.ndarray) -> np.ndarray:
    """x minus its per-block int8 rounding as MatMulNBits at accuracy 4 does it (numpy twin of rewrite)."""
    xb = x.reshape(*x.shape[:-1], -1, 32)
    inv = np.float32(127) / np.maximum(np.abs(xb).max(-1, keepdims=True), np.float32(1e-30))
    t = xb * inv
    return ((t - np.round(t)) / inv).reshape(x.shape).astype(np.float32)


def kernel_check(threads: int) -> None:
    """One 576x3072 4-bit MatMulNBits: float kernel vs int8 kernel with 1, 2, 3 stages."""
    import onnxruntime as ort
    from onnx import TensorProto

    k, n, rng = 576, 3072, np.random.default_rng(1)
    inits = [numpy_helper.from_array(rng.integers(0, 256, (n, k // 32, 16), dtype=np.uint8), "B"),
             numpy_helper.from_array(((rng.random(n * k // 32) + 0.5) * 0.01).astype(np.float32), "S"),
             numpy_helper.from_array(rng.integers(0, 256, n * k // 64, dtype=np.uint8), "Z")]
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = {}
    for acc in (1, 4):
        node = helper.make_node("MatMulNBits", ["A", "B", "S", "Z"], ["Y"], domain="com.microsoft", K=k, N=n,
                                bits=4, block_size=32, accuracy_level=acc)
        g = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])], inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
        sess[acc] = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    x = (rng.standard_normal((1, k)) * np.exp(rng.standard_normal((1, k)))).astype(np.float32)
    ref = sess[1].run(None, {"A": x})[0][0]
    rows = [x]
    print("| int8 rows | max error / max abs(y) |\n|---:|---:|")
    for stages in (1, 2, 3):
        y = sess[4].run(None, {"A": np.concatenate(rows)})[0].sum(0)
        print(f"| {stages} | {np.abs(y - ref).max() / np.abs(ref).max():.1e} |")
        rows.append(residual(rows[-1]))
    times = {"float kernel, 1 row": (sess[1], x), "int8 kernel, 2 rows": (sess[4], np.concatenate(rows[:2]))}
    t_us = {name: [] for name in times}
    for _ in range(9):
        for name, (s, a) in times.items():
            t = time.perf_counter()
            for _ in range(50):
                s.run(None, {"A": a})
            t_us[name].append((time.perf_counter() - t) / 50 * 1e6)
    print("\n" + "; ".join(f"{name}: {np.median(v):.1f} us" for name, v in t_us.items()) + "\n")


def residual_package(pkg: Path, stages: int, into: Path) -> Path:
    """A copy of ``pkg`` (hard links) whose static-int8 graph carries the residual rows."""
    for f in pkg.iterdir():
        try:
            os.link(f, into / f.name)
        except OSError:
            shutil.copy2(f, into / f.name)
    m = mf.Manifest.load(pkg)
    file = m.variant("static-int8").file
    model = onnx.load(str(pkg / file), load_external_data=False)
    n = rewrite(model.graph, stages, m.model.vocab_size)
    (into / file).unlink()
    onnx.save(model, str(into / file))
    print(f"rewrote {n} MatMulNBits nodes ({stages} stages), graph now {len(model.graph.node)} nodes")
    return into


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("package", nargs="?", default=None, help="an int4 package with static-int8 (default model)")
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    kernel_check(2)
    exact = portable_infer.load(args.package, "cpu", intra_op_threads=2, accuracy_level=1)
    with tempfile.TemporaryDirectory(dir=exact.path.parent) as tmp:  # same filesystem: hard links
        models = {"exact (static)": exact,
                  "int8 (static-int8)": portable_infer.load(exact.path, "cpu", intra_op_threads=2, accuracy_level=4),
                  f"int8 + residual x{args.stages - 1}": portable_infer.load(
                      residual_package(exact.path, args.stages, Path(tmp)), "cpu", intra_op_threads=2,
                      accuracy_level=4, check="none")}
        ids = exact.encode((REPO / "README.md").read_text())[:args.tokens]
        ref = exact.forward_logits(ids).argmax(-1)
        agree = {k: int((m.forward_logits(ids).argmax(-1) == ref).sum()) for k, m in models.items()}
        rng = np.random.default_rng(0)
        prompts = [rng.integers(3, exact.manifest.model.vocab_size, 32).tolist() for _ in range(args.batch)]
        speed = {k: ([], []) for k in models}
        for _ in range(args.rounds):
            for k, m in models.items():
                for b, out in ((1, speed[k][0]), (args.batch, speed[k][1])):
                    t = time.perf_counter()
                    m.batch_generate(prompts[:b], max_new_tokens=32, ignore_eos=True)
                    out.append(b * 32 / (time.perf_counter() - t))
    print(f"\n| graph | top-1 = exact (of {len(ids)}) | batch 1 tok/s | batch {args.batch} tok/s |\n|---|---:|---:|---:|")
    for k in models:
        print(f"| {k} | {agree[k]} | {np.median(speed[k][0]):.1f} | {np.median(speed[k][1]):.1f} |")
    print(f"\nmedians of {args.rounds} rounds, 32-token prompts, 32 new tokens (prefill included), 2 threads")


if __name__ == "__main__":
    main()
