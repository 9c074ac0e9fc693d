"""The scheduler's planner on fake requests: no model, no ONNX Runtime, no cache.

Admission (FIFO, slots, KV blocks), the prefix cache's first look, grouped and chunked prefill,
leaves (finish, cancel, deferred on fixed buffers) and a mixed step, with hand-computed plans;
then invariants over random queues. The random queues come from a seeded generator; the seed is
printed (and in every failure message) and can be set with SCHED_PLAN_SEED. The last test runs
this module in a subprocess where ``import onnxruntime`` fails.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from portable_infer.serving.scheduler_plan import (
    GROUP_CHUNKS, FromPrefix, Planner, Prefill, PrefillSlice, QueueView, StepPlan,
)

SEED = int(os.environ.get("SCHED_PLAN_SEED") or random.SystemRandom().randrange(2**31))
TAG = f"[SCHED_PLAN_SEED={SEED}]"
CHUNK = 16


@dataclass(eq=False)
class Fake:
    """What the planner reads of a request (scheduler_plan.PlanRequest)."""

    id: str
    prompt_len: int
    max_new_tokens: int = 8
    blocks: int = 1
    state: str = "prefilling"
    prefilled: int = 0
    prefix_checked: bool = True
    alone: bool = False
    short_prefix: int = 0


def planner(**kw) -> Planner:
    return Planner(**{"max_batch": 8, "prefill_chunk": CHUNK, "max_context": 256, **kw})


def view(waiting=(), prefilling=(), rows=(), active=None, free_blocks=100) -> QueueView:
    if active is None:
        active = sum(r.state != "done" for r in (*prefilling, *rows))
    return QueueView(tuple(waiting), tuple(prefilling), tuple(rows), active, free_blocks)


def no_prefix(r) -> int:
    raise AssertionError(f"the planner asked the prefix cache about {r.id}, which it had seen already")


def test_admission_is_fifo_so_a_large_request_is_not_starved():
    big, small = Fake("big", 10, blocks=10, state="waiting"), Fake("small", 3, blocks=1, state="waiting")
    p = planner()
    assert p.admit([big, small], active=0, free_blocks=5) == ()  # small does not overtake big
    assert p.admit([big, small], active=0, free_blocks=10) == ("big",)
    assert p.admit([big, small], active=0, free_blocks=11) == ("big", "small")


def test_admission_stops_at_the_slot_limit_and_the_kv_budget():
    waiting = [Fake(f"w{i}", 4, blocks=2, state="waiting") for i in range(5)]
    assert planner(max_batch=4).admit(waiting, active=3, free_blocks=100) == ("w0",)
    assert planner(max_batch=4).admit(waiting, active=4, free_blocks=100) == ()
    assert planner().admit(waiting, active=0, free_blocks=5) == ("w0", "w1")  # 2 + 2 of 5 blocks
    plan = planner(max_batch=2).plan(view(waiting, active=0, free_blocks=100), lambda r: 0)
    assert plan.admit == ("w0", "w1") and [s.request for s in plan.prefill.slices] == ["w0", "w1"]


def test_short_prompts_are_prefilled_together_up_to_four_chunks():
    lens = (16, 16, 16, 16, 5)  # each fits a chunk; the fifth would make 69 > 4 x 16 tokens
    queue = [Fake(f"r{i}", n, max_new_tokens=10 * i) for i, n in enumerate(lens)]
    plan = planner().plan(view(prefilling=queue), no_prefix)
    assert plan.prefill == Prefill(tuple(PrefillSlice(f"r{i}", 0, 16, True) for i in range(4)),
                                   capacity=16 + 30, grouped=True)
    assert GROUP_CHUNKS * CHUNK == 64 and plan.prefill.tokens == 64 and len(plan.prefill) == 4
    assert plan.decode  # the group joins the batch and decodes in the same step


def test_a_prompt_longer_than_a_chunk_ends_the_group_and_a_lone_head_is_not_a_group():
    queue = [Fake("a", 10), Fake("long", 40), Fake("b", 5)]
    plan = planner().plan(view(prefilling=queue), no_prefix)
    assert plan.prefill == Prefill((PrefillSlice("a", 0, 10, True),), capacity=18, grouped=False)
    alone = [Fake("a", 10, alone=True), Fake("b", 5)]  # its grouped prefill failed: alone now
    assert planner().plan(view(prefilling=alone), no_prefix).prefill.slices == (PrefillSlice("a", 0, 10, True),)


def test_a_long_prompt_is_prefilled_alone_one_chunk_per_step():
    r = Fake("long", 40, max_new_tokens=300)
    seen = []
    for _ in range(3):
        step = planner().plan(view(prefilling=[r, Fake("short", 4)]), no_prefix).prefill
        assert not step.grouped and step.capacity == 256  # 40 + 300 tokens, capped by the context
        (s,) = step.slices
        seen.append((s.start, s.end, s.last))
        r.prefilled = s.end
    assert seen == [(0, 16, False), (16, 32, False), (32, 40, True)]


def test_first_look_reuses_a_long_enough_cached_prefix_and_notes_a_short_one():
    fresh = [Fake("hit", 40, prefix_checked=False), Fake("short", 12, prefix_checked=False),
             Fake("miss", 9, prefix_checked=False)]
    cached = {"hit": 32, "short": 8, "miss": 0}
    plan = planner(prefix_min=16).plan(view(prefilling=fresh), lambda r: cached[r.id])
    assert plan.checked == ("hit", "short", "miss")
    assert plan.from_prefix == (FromPrefix("hit", 32, 48),) and plan.short_prefix == (("short", 8),)
    # the head starts from its prefix, so it is not grouped: its remaining tokens alone
    assert plan.prefill.slices == (PrefillSlice("hit", 32, 40, True),)

    grouped = planner(prefix_min=16).plan(view(prefilling=fresh[1:]), lambda r: cached[r.id])
    assert grouped.prefill.grouped and grouped.prefill.slices[0] == PrefillSlice("short", 0, 12, True)
    assert grouped.from_prefix == ()  # a short hit is recomputed inside the group's forward

    alone = Fake("short", 12, short_prefix=8)  # seen before, prefilled alone now: reuses it
    plan = planner(prefix_min=16).plan(view(prefilling=[alone]), lambda r: cached[r.id])
    assert plan.from_prefix == (FromPrefix("short", 8, 20),) and plan.short_prefix == (("short", 0),)
    assert plan.prefill.slices == (PrefillSlice("short", 8, 12, True),)

    off = planner(prefix_cache=False).plan(view(prefilling=fresh), no_prefix)
    assert off.checked == ("hit", "short", "miss") and off.from_prefix == ()
    assert off.prefill.slices == (PrefillSlice("hit", 0, 16, False),)


def test_finished_and_cancelled_rows_leave_before_the_forwards():
    rows = [Fake("a", 4, state="running"), Fake("stop", 4, state="done"), Fake("b", 4, state="running")]
    assert planner().plan(view(rows=rows), no_prefix) == StepPlan(leave=("stop",), decode=True)
    rows[0].state = rows[2].state = "done"  # cancelled: the batch is empty after them
    assert planner().plan(view(rows=rows), no_prefix) == StepPlan(leave=("a", "stop", "b"), decode=False)
    cancelled = [Fake("gone", 5, state="done"), Fake("next", 6)]  # ended while it waited to prefill
    plan = planner().plan(view(prefilling=cancelled), no_prefix)
    assert plan.drop == ("gone",) and plan.prefill.slices == (PrefillSlice("next", 0, 6, True),)


def test_deferred_leave_waits_for_half_the_batch_or_a_join():
    rows = [Fake(f"r{i}", 4, state="running") for i in range(4)]
    rows[0].state = "done"
    defer = planner(defer_leave=True)
    assert defer.plan(view(rows=rows), no_prefix) == StepPlan(decode=True)  # 1 of 4: it waits, masked
    joining = defer.plan(view(prefilling=[Fake("new", 5)], rows=rows), no_prefix)
    assert joining.leave == ("r0",) and joining.prefill.joins  # a join compacts the batch
    rows[1].state = "done"
    assert defer.plan(view(rows=rows), no_prefix).leave == ("r0", "r1")  # half the batch finished
    chunk = defer.plan(view(prefilling=[Fake("long", 40)], rows=rows[1:]), no_prefix)
    assert chunk.leave == () and not chunk.prefill.joins  # 1 of 3, and no prompt ends this step


def test_a_mixed_step():
    rows = [Fake("run", 9, state="running"), Fake("fin", 7, state="done")]
    prefilling = [Fake("long", 50, prefilled=16), Fake("s1", 6)]
    waiting = [Fake("w1", 8, state="waiting", prefix_checked=False, blocks=1),
               Fake("w2", 8, state="waiting", prefix_checked=False, blocks=50)]
    plan = planner(max_batch=5).plan(view(waiting, prefilling, rows, free_blocks=10), lambda r: 0)
    assert plan == StepPlan(
        admit=("w1",), checked=("w1",),  # w2's 50 blocks do not fit the 9 left
        prefill=Prefill((PrefillSlice("long", 16, 32, False),), capacity=58, grouped=False),
        leave=("fin",), decode=True)
    assert not plan.idle and planner().plan(view(), no_prefix).idle


def random_fake(rng, i: int, state: str) -> Fake:
    n = int(rng.integers(1, 5 * CHUNK))
    return Fake(f"q{i}", n, int(rng.integers(1, 64)), int(rng.integers(1, 8)), state,
                prefilled=int(rng.integers(0, n)) if state == "prefilling" and rng.random() < 0.2 else 0,
                prefix_checked=bool(rng.random() < 0.5), alone=bool(rng.random() < 0.1))


def test_random_queues_keep_the_rules():
    import numpy as np

    print(TAG)
    rng = np.random.default_rng(SEED)
    for trial in range(300):
        states = rng.choice(["waiting", "prefilling", "running", "done"], int(rng.integers(0, 14)))
        reqs = [random_fake(rng, i, str(s)) for i, s in enumerate(states)]
        waiting = [r for r in reqs if r.state == "waiting"]
        prefilling = [r for r in reqs if r.state in ("prefilling", "done") and rng.random() < 0.5]
        rows = [r for r in reqs if r.state in ("running", "done") and r not in prefilling]
        free = int(rng.integers(0, 30))
        p = planner(max_batch=int(rng.integers(1, 10)), prefix_min=int(rng.integers(0, 40)),
                    defer_leave=bool(rng.random() < 0.5))
        active = sum(r.state != "done" for r in (*prefilling, *rows))
        plan = p.plan(view(waiting, prefilling, rows, active, free), lambda r: int(rng.integers(0, r.prompt_len)))
        where = f"{TAG} trial {trial}: {plan}"
        assert plan.admit == tuple(r.id for r in waiting[:len(plan.admit)]), where  # FIFO
        assert active + len(plan.admit) <= max(p.max_batch, active), where
        assert sum(r.blocks for r in waiting[:len(plan.admit)]) <= free, where
        assert set(plan.drop) == {r.id for r in prefilling if r.state == "done"}, where
        assert set(plan.leave) <= {r.id for r in rows if r.state == "done"}, where
        if plan.prefill is not None:
            ids = {s.request for s in plan.prefill.slices}
            assert not ids & set(plan.drop) and not ids & {r.id for r in rows}, where
            if plan.prefill.grouped:
                assert len(ids) > 1 and plan.prefill.tokens <= GROUP_CHUNKS * CHUNK, where
                assert all(s.end - s.start <= CHUNK and s.start == 0 and s.last for s in plan.prefill.slices), where
            else:
                (s,) = plan.prefill.slices
                assert 0 < s.end - s.start <= CHUNK, where
        live = [r for r in rows if r.id not in plan.leave]
        assert plan.decode == (any(r.state != "done" for r in live) or bool(plan.prefill and plan.prefill.joins)), where


def test_the_planner_runs_without_onnx_runtime():
    """This module, run in a fresh interpreter where ``import onnxruntime`` fails, passes, and
    nothing it imports pulled ONNX Runtime in."""
    here = Path(__file__).resolve().parent
    code = (
        "import sys\n"
        "sys.modules['onnxruntime'] = None  # any import of it raises ImportError\n"
        f"sys.path.insert(0, {str(here)!r})\n"
        "import test_scheduler_plan as t\n"
        "names = [n for n in dir(t) if n.startswith('test_') and n != 'test_the_planner_runs_without_onnx_runtime']\n"
        "for n in names:\n"
        "    getattr(t, n)()\n"
        "assert sys.modules['onnxruntime'] is None\n"
        "print('ran', len(names), 'tests;', 'torch' in sys.modules)\n"
    )
    env = {**os.environ, "SCHED_PLAN_SEED": str(SEED), "PYTHONPATH": str(here.parent)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, f"{TAG} {out.stderr[-3000:]}"
    ours = sum(1 for n in globals() if n.startswith("test_")) - 1
    # every other test ran, and neither ONNX Runtime nor torch was imported
    assert out.stdout.strip().splitlines()[-1] == f"ran {ours} tests; False", out.stdout
