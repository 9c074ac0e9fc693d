"""Per-op profile of one package's decode steps on CUDA (run after gpu_bench.py built /tmp/gpubench)."""
import collections, json, sys, time
from pathlib import Path
import numpy as np
import onnxruntime as ort
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from portable_infer.package.manifest import Manifest
from portable_infer.engine.growing import GrowingEngine
from portable_infer.engine.session import SessionConfig
from portable_infer.decode.generate import BatchDecoder
from portable_infer.decode.sampling import SamplingParams

pkg = Path(sys.argv[1]); batch = int(sys.argv[2]) if len(sys.argv) > 2 else 1
m = Manifest.load(pkg); v = m.variant("fused")
so = SessionConfig().session_options(ort); so.enable_profiling = True; so.profile_file_prefix = "/tmp/prof"
s = ort.InferenceSession(str(pkg / v.file), so, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
eng = GrowingEngine(s, v, "CUDAExecutionProvider", ort, max_context=m.model.max_context)
ps = np.random.default_rng(0).integers(3, 49152, (batch, 32)).tolist()
dec = BatchDecoder(eng, ps, [SamplingParams(max_new_tokens=64, ignore_eos=True)] * batch, max_context=2048)
t = time.perf_counter(); dec.run(); wall = time.perf_counter() - t
p = s.end_profiling(); ev = json.load(open(p))
by = collections.Counter(); prov = collections.Counter(); n = collections.Counter(); tot = 0
for e in ev:
    if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
        k = (e["args"]["op_name"], e["args"].get("provider", "?")); by[k] += e["dur"]; n[k] += 1; tot += e["dur"]
print(f"batch {batch}: wall {wall*1000:.0f} ms for {dec.timings['decode_steps']} steps; kernel time {tot/1000:.0f} ms")
for k, d in by.most_common(25): print(f"{k[0]:34s} {k[1]:26s} {d/1000:8.1f} ms  x{n[k]}")
