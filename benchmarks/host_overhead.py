"""The serving loop's own cost: the scheduler at N streams over an engine that costs nothing.

    .venv/bin/python benchmarks/host_overhead.py [PKG] [--streams 16 64 256] [--prompt 128]
        [--new 256] [--step-ms MS] [--emit auto|on|off] [--profile FILE] [--stop-strings] [--sampled]

Whatever the step loop spends per step besides the forward (planning, each row's
``Sequence.step``, detokenizing, stop strings, handing pieces to the streams) bounds the
aggregate tokens/s however fast the device is. This runs the real
:class:`~portable_infer.serving.scheduler.Scheduler` on PKG's tokenizer and sampling rules over
``NullEngine``: forwards return token ids drawn at random (as the graph's device argmax would: no
logits come to the host) and caches hold no KV. Each level submits N requests at once (random
prompt ids, ``--new`` tokens each, ignore_eos) and N coroutines in one asyncio loop read their
streams, as the server's handlers do. Printed per level: the tokens/s the steps allow at the
largest batch they reached, that step's median time, and the host's time per row in it.

``--step-ms`` makes each decode forward sleep that long with the GIL released, as ONNX Runtime's
run of a GPU step does: what the host does meanwhile (other threads: the emitter, the readers)
is hidden, what it does between forwards is not. ``--emit`` sets ``SchedulerConfig.emit_thread``
(auto: on, since the null engine says it runs on cuda). ``--profile`` writes cProfile stats of
the step loop's thread for the largest level.

``--slots`` sets ``SchedulerConfig.slot_batch`` (default on, as on GPUs for static graphs).

``--real PROVIDER`` runs the package's own engine on PROVIDER (e.g. cuda) instead of the null
one: the whole step loop as the server runs it, in this process; ``--profile`` then profiles each
step (``Scheduler._step``: leaves, prefills, decodes, hand-over). Printed after each level: the
step loop's clock (``SchedulerStats.steps``).

``--sampled`` draws at temperature 0.7 / top-p 0.9 instead, on logits the null engine returns
(what a host-sampled batch costs: its logits' transfer excluded).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import portable_infer  # noqa: E402
from portable_infer.engine import padding  # noqa: E402
from portable_infer.serving import slot_batch  # noqa: E402
from portable_infer.serving.scheduler import Scheduler, SchedulerConfig  # noqa: E402


class NullCache:
    """A cache with the row bookkeeping of a real one and no KV."""

    def __init__(self, layout, batch: int, capacity: int, rows=None, length: int = 0, start: int = 0, owner=None):
        self.layout, self.batch, self.capacity, self.length = layout, batch, capacity, length
        self.rows = np.zeros(batch, np.int64) if rows is None else rows
        self.start, self.owner = start, owner  # a view's rows of its owner (the slot batch's buffer)

    bytes_per_token = 0

    def nbytes(self) -> int:
        return 0

    def advance(self, mask: np.ndarray, new: int) -> None:
        self.rows = self.rows + mask[:, -new:].sum(axis=1)
        self.length = mask.shape[1]

    def merge(self, mask, other, other_mask):
        merged = NullCache(self.layout, self.batch + other.batch, max(self.capacity, other.capacity),
                           np.concatenate([self.rows, other.rows]), max(self.length, other.length))
        return merged, padding.stack(mask, self.length, other_mask, other.length)

    def take(self, mask, keep):
        sub, start = padding.keep_rows(mask, keep)
        return NullCache(self.layout, len(keep), self.capacity, self.rows[np.asarray(keep)], self.length - start), sub

    def prompt_kv(self, prompts, rows):
        return [[] for _ in rows]

    def fill_prefix(self, arrays, n):
        self.rows, self.length = np.array([n], np.int64), n


class NullEngine:
    """The model's engine's attributes, forwards that return random ids (or random logits) at once."""

    masks_on_device = False
    samples_on_device = False

    def __init__(self, engine, vocab: int, device: str, seed: int, step_s: float = 0.0, token_s: float = 0.0):
        self.step_s = step_s  # each decode forward sleeps this long (the GIL released, as a GPU step)
        self.token_s = token_s  # a prefill forward sleeps this long a prompt token (rows x width)
        self.provider, self.variant, self.max_context = engine.provider, engine.variant, engine.max_context
        self.device, self.greedy_on_device, self.vocab = device, True, vocab
        self.rng = np.random.default_rng(seed)
        self.steps: list = []  # (batch, seconds since the previous forward)
        self._last = None

    def new_cache(self, batch, capacity=None):
        return NullCache(self.variant.kv, batch, capacity or self.max_context)

    def buffer(self, batch, capacity, most=None):  # the slot batch's (serving/slot_batch.py; StaticEngine.buffer)
        return NullCache(self.variant.kv, batch, capacity if most is None else min(capacity, most), np.ones(batch, np.int64))

    def view(self, cache, start, count, decode=False):
        return NullCache(self.variant.kv, count, cache.capacity, start=cache.start + start, owner=cache.owner or cache)

    def forward(self, ids, mask, cache, *, greedy=False, all_logits=False):
        now = time.perf_counter()
        if self._last is not None:
            self.steps.append((ids.shape[0], ids.shape[1], now - self._last))
        self._last = now
        cache.advance(mask, ids.shape[1])
        if self.step_s and ids.shape[1] == 1:
            time.sleep(self.step_s)
        elif self.token_s and ids.shape[1] > 1:
            time.sleep(self.token_s * ids.size)
        if greedy:
            return self.rng.integers(0, self.vocab, ids.shape[0])
        return self.rng.standard_normal((ids.shape[0], self.vocab), np.float32)

    def forward_on_device(self, ids, mask, cache):
        raise NotImplementedError

    def trim(self, dropped_bytes):
        pass


def null_moves() -> None:
    """The slot batch moves no KV rows: null caches hold none (its joins and compactions)."""
    slot_batch.copy_rows = slot_batch.move_rows = lambda *a: None


def level(model, streams: int, args, profile: str | None) -> dict:
    engine = None if args.real else NullEngine(model.engine, model.codec.vocab_size, args.device, args.seed,
                                               args.step_ms / 1e3)
    config = SchedulerConfig(max_batch=streams, max_waiting=streams, kv_budget_tokens=streams * (args.prompt + args.new),
                             prefill_chunk=args.prefill_chunk,
                             emit_thread={"auto": None, "on": True, "off": False}[args.emit],
                             slot_batch={"auto": None, "on": True, "off": False}[args.slots])
    rng = np.random.default_rng(args.seed + streams)
    sampling = dict(temperature=0.7, top_p=0.9, seed=1) if args.sampled else dict(temperature=0.0)
    if args.stop_strings:
        sampling["stop"] = ["\n\n\n\n\n"]
    counts = [0] * streams
    if engine is not None:
        null_moves()
    with Scheduler(model, config) as sched:
        if engine is not None:
            sched.engine = engine
        if args.no_overlap:
            sched.batch.overlap = False
        prof = cProfile.Profile() if profile else None
        if prof and engine is None:  # every step (the loop thread)
            sched._step = _profiled(prof, sched._step)
        elif prof:  # the step loop's thread only (the text, with --emit off: hand_over delivers it there)
            sched.batch.decode = _profiled(prof, sched.batch.decode)
            sched.queues.hand_over = _profiled(prof, sched.queues.hand_over)
        clock0 = sched.stats().steps
        handles = [sched.submit_ids(rng.integers(100, model.codec.vocab_size, args.prompt).tolist(),
                                    model.params(max_new_tokens=args.new, ignore_eos=True, **sampling))
                   for _ in range(streams)]
        t0 = time.perf_counter()

        async def read(i):
            async for _ in handles[i]:
                counts[i] += 1

        async def read_all():
            await asyncio.gather(*(read(i) for i in range(streams)))

        asyncio.run(read_all())  # one event loop for every stream, as the server's
        wall = time.perf_counter() - t0
        clock = {k: v - clock0[k] for k, v in sched.stats().steps.items()}
    n = max(clock["decode_steps"], 1)
    print(f"  {streams} streams, {clock_line(clock, wall)}", flush=True)
    if prof:
        prof.dump_stats(profile)
    if engine is None:
        return {"wall_s": wall, "step_ms": 1e3 * (clock["decode_forward"] + clock["decode_host"]) / n,
                "ceiling_tok_s": streams * args.new / wall, "batch": round(clock["decode_rows"] / n)}
    top = max((b for b, s, _ in engine.steps if s == 1), default=0)  # the full batch (all streams joined)
    full = [dt for b, s, dt in engine.steps if b == top and s == 1]
    step = statistics.median(full) if full else float("nan")
    if sum(counts) != streams * args.new:  # one piece per token unless a stop string cut a reply
        print(f"  note: the readers got {sum(counts)} pieces of {streams * args.new} tokens")
    return {"wall_s": wall, "step_ms": 1e3 * step, "ceiling_tok_s": top / step if full else float("nan"), "batch": top}


def clock_line(clock: dict, wall: float) -> str:
    """Where a level's ``wall`` seconds went, from the scheduler's step clock (``SchedulerStats.steps``,
    the level's difference)."""
    n = max(clock["decode_steps"], 1)
    return (f"{wall:.2f} s: decode {clock['decode_steps']} steps of {clock['decode_rows'] / n:.1f} rows, "
            f"{1e3 * clock['decode_forward'] / n:.2f} + {1e3 * clock['decode_host'] / n:.2f} ms (forward + host); "
            f"prefill {clock['prefill_steps']} steps, {clock['prefill_forward']:.2f} + {clock['prefill_host']:.2f} s; "
            f"plan {clock['plan']:.2f} s, idle {clock['idle']:.2f} s")


def _profiled(prof, fn):
    def run(*a, **kw):
        return prof.runcall(fn, *a, **kw)
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("package", nargs="?", default=None, help="package for the tokenizer and rules (default model)")
    ap.add_argument("--streams", type=int, nargs="+", default=[16, 64, 256])
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--prefill-chunk", type=int, default=2048)
    ap.add_argument("--device", default="cuda", help="what the null engine says it runs on (the planner reads it)")
    ap.add_argument("--step-ms", type=float, default=0.0,
                    help="each decode forward sleeps this long with the GIL released (a GPU step's time)")
    ap.add_argument("--emit", choices=("auto", "on", "off"), default="auto",
                    help="SchedulerConfig.emit_thread (auto: on, the null engine says cuda)")
    ap.add_argument("--slots", choices=("auto", "on", "off"), default="on",
                    help="SchedulerConfig.slot_batch (on: the GPU default for static graphs; off: restacked)")
    ap.add_argument("--no-overlap", action="store_true", help="slot batch: greedy forwards wait for the host's picks")
    ap.add_argument("--sampled", action="store_true")
    ap.add_argument("--stop-strings", action="store_true")
    ap.add_argument("--profile", default=None)
    ap.add_argument("--real", default=None, metavar="PROVIDER", help="the package's own engine on PROVIDER")
    ap.add_argument("--seed", type=int, default=None)
    args = ap.parse_args()
    args.seed = args.seed if args.seed is not None else int(np.random.SeedSequence().entropy % 2**31)
    print(f"seed {args.seed}")
    model = portable_infer.load(args.package, providers=args.real or "cpu")
    print(f"decode forwards sleep {args.step_ms} ms (GIL released); emit thread {args.emit}")
    print("| streams | generated tok/s | step ms at full batch | host us per row per step |")
    print("|---|---|---|---|")
    for n in args.streams:
        r = level(model, n, args, args.profile if n == max(args.streams) else None)
        host_ms = r["step_ms"] - args.step_ms
        print(f"| {n} ({r['batch']} in a step) | {r['ceiling_tok_s']:,.0f} | {r['step_ms']:.2f} | {1e3 * host_ms / r['batch']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
