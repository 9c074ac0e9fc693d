"""GPU smoke check (not committed): slot batch vs restacked batch, same greedy tokens; times."""
import subprocess, sys, time
import numpy as np
import portable_infer
from portable_infer.serving.scheduler import Scheduler, SchedulerConfig
pkg = "/root/work/smollm2-slot-fp16"
r = subprocess.run([sys.executable, "-m", "portable_infer.cli", "export", "default", "-o", pkg, "--precision", "fp16",
                    "--activations", "fp16", "--variants", "static", "--no-verify", "--force"], capture_output=True, text=True)
print("export rc", r.returncode, r.stderr[-500:] if r.returncode else "")
m = portable_infer.load(pkg, "cuda")
print(m.variant, m.engine.cuda_graph)
rng = np.random.default_rng(7)
ps = [rng.integers(100, 40000, int(n)).tolist() for n in rng.integers(4, 200, 96)]
news = [int(n) for n in rng.integers(4, 120, 96)]
outs = {}
for rep in range(2):
    for slots in (False, True):
        t = time.perf_counter()
        with Scheduler(m, SchedulerConfig(max_batch=32, prefill_chunk=128, slot_batch=slots)) as s:
            hs = [s.submit(p, max_new_tokens=n, ignore_eos=True) for p, n in zip(ps, news)]
            outs[slots] = [[r.token for r in h if r.token is not None] for h in hs]
        dt = time.perf_counter() - t
        print("slots" if slots else "restack", f"{dt:.2f} s", f"{sum(news) / dt:.0f} tok/s", flush=True)
same = sum(a == b for a, b in zip(outs[False], outs[True]))
print("equal", same, "of", len(ps))
