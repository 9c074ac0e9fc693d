"""One request's failure never fails the others (issue 16, item 1).

A poisoned request (NaN logits for its rows only, a forward that fails when its prompt is in
it, a detokenizer that raises) runs in the same decode step or the same grouped prefill as
healthy ones: the healthy ones finish with exactly the tokens of their single runs, the poisoned
one ends with a typed error, and the KV blocks all come back. A tiny temperature (1e-300, which
once overflowed the logits and failed the whole step) is greedy decoding.

Prompts come from a seeded generator; the seed is printed (and in every failure message) and
can be set with ISOLATION_SEED.
"""

from __future__ import annotations

import os
import random
import threading
import time

import numpy as np
import pytest

pytest.importorskip("torch")

from portable_infer.errors import GenerationError, PortableInferError  # noqa: E402
from portable_infer.serving.scheduler import Scheduler, SchedulerConfig  # noqa: E402
from portable_infer.text.streaming import TextStream  # noqa: E402

SEED = int(os.environ.get("ISOLATION_SEED") or random.SystemRandom().randrange(2**31))
TAG = f"[ISOLATION_SEED={SEED}]"
TIMEOUT_S = 30  # every wait is bounded
NEW = 10


@pytest.fixture(scope="module")
def fused(tiny_llama, load_variant):
    print(TAG)
    return load_variant(tiny_llama.package, "fused")


def make_prompts(offset: int, lengths) -> list:
    rng = np.random.default_rng(SEED + offset)
    return [rng.integers(3, 256, n).tolist() for n in lengths]  # never pad, bos or eos


def tokens(handle) -> list:
    out, deadline = [], time.monotonic() + TIMEOUT_S
    for r in handle:
        if r.token is not None:
            out.append(r.token)
        assert time.monotonic() < deadline, f"{TAG} request did not finish in time"
    return out


def wait_for(cond, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not cond():
        assert time.monotonic() < deadline, f"{TAG} timed out waiting for {what}"
        time.sleep(0.002)


def rows_of(ids: np.ndarray, mask: np.ndarray, prompt: list) -> list:
    """Rows of a (left-padded) prefill input that hold exactly ``prompt``."""
    n = len(prompt)
    return [i for i in range(ids.shape[0])
            if int(mask[i, -ids.shape[1]:].sum()) == n and ids[i, -n:].tolist() == prompt]


class Poison:
    """Engine stand-in: runs the real forward, then breaks what belongs to the poisoned request.

    ``where``: "decode" (NaN logits for its row in decode steps), "group" (NaN logits for its row
    in a grouped prefill), "raise" (every prefill holding it raises, as a request-specific shape
    or kernel failure would). ``gate``: every forward waits for it first."""

    def __init__(self, engine, sched, poisoned: list, where: str, gate: threading.Event):
        self.engine, self.sched, self.poisoned, self.where, self.gate = engine, sched, poisoned, where, gate
        self.hit_batches = []  # batch sizes of the calls that poisoned something

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def forward(self, ids, mask, cache, **kw):
        assert self.gate.wait(TIMEOUT_S)
        B, S = ids.shape
        grouped = B > 1 and S > 1
        if self.where == "raise" and S > 1 and rows_of(ids, mask, self.poisoned):
            self.hit_batches.append(B)
            raise RuntimeError("a kernel failure that this one request causes")
        out = self.engine.forward(ids, mask, cache, **kw)
        if self.where == "decode" and S == 1:
            rows = [i for i, r in enumerate(self.sched.batch.rows) if r.prompt == self.poisoned and r.state != "done"]
        elif self.where == "group" and grouped:
            rows = rows_of(ids, mask, self.poisoned)
        else:
            rows = []
        if rows:
            self.hit_batches.append(B)
            out = np.array(out)
            out[rows] = np.nan
        return out


def run_with_poison(fused, where: str, offset: int):
    healthy = make_prompts(offset, (7, 12, 5, 9))
    poisoned = make_prompts(offset + 100, (8,))[0]
    ref = [fused.generate_ids(p, max_new_tokens=NEW, ignore_eos=True) for p in healthy]
    gate = threading.Event()
    with Scheduler(fused, SchedulerConfig(max_batch=8, prefill_chunk=64)) as sched:
        spy = Poison(sched.engine, sched, poisoned, where, gate)
        sched.engine = spy
        handles = [sched.submit(p, max_new_tokens=NEW, ignore_eos=True) for p in healthy[:2]]
        bad = sched.submit(poisoned, max_new_tokens=NEW, ignore_eos=True)
        handles += [sched.submit(p, max_new_tokens=NEW, ignore_eos=True) for p in healthy[2:]]
        wait_for(lambda: sched.stats().prefilling + sched.stats().running == 5, "admission")
        gate.set()  # all five admitted: they are prefilled together, then decode together
        outs = [tokens(h) for h in handles]
        with pytest.raises(PortableInferError) as err:
            tokens(bad)
        stats = sched.stats()
    return outs, ref, err.value, stats, spy


def test_nan_logits_of_one_row_in_a_decode_step_end_only_that_request(fused):
    outs, ref, err, stats, spy = run_with_poison(fused, "decode", 0)
    # its prefill group had >= 3 of the 5 (however the loop split the queue): so has its decode step
    assert spy.hit_batches and spy.hit_batches[0] >= 3, f"{TAG} not poisoned beside others: {spy.hit_batches}"
    assert outs == ref, f"{TAG} healthy requests changed beside a poisoned one"
    assert isinstance(err, GenerationError) and err.reason == "nan_logits", f"{TAG} {err!r}"
    assert "NaN" in str(err) and "finite maximum" not in str(err)
    assert (stats.requests_failed, stats.requests_finished, stats.blocks_used) == (1, 4, 0), f"{TAG} {stats}"


def test_nan_logits_of_one_row_in_a_grouped_prefill_end_only_that_request(fused):
    outs, ref, err, stats, spy = run_with_poison(fused, "group", 1)
    assert spy.hit_batches and spy.hit_batches[0] >= 3, f"{TAG} no grouped prefill with it: {spy.hit_batches}"
    assert outs == ref, f"{TAG} healthy requests changed beside a poisoned one"
    assert isinstance(err, GenerationError) and err.reason == "nan_logits", f"{TAG} {err!r}"
    assert (stats.requests_failed, stats.requests_finished, stats.blocks_used) == (1, 4, 0), f"{TAG} {stats}"


def test_a_grouped_prefill_that_fails_is_retried_one_request_at_a_time(fused):
    outs, ref, err, stats, spy = run_with_poison(fused, "raise", 2)
    assert spy.hit_batches[0] >= 3 and spy.hit_batches[-1] == 1, f"{TAG} not grouped, then alone: {spy.hit_batches}"
    assert outs == ref, f"{TAG} healthy requests failed with the group"
    assert isinstance(err, GenerationError) and isinstance(err.__cause__, RuntimeError), f"{TAG} {err!r}"
    assert (stats.requests_failed, stats.requests_finished, stats.blocks_used) == (1, 4, 0), f"{TAG} {stats}"


class Exploding(TextStream):
    """A detokenizer stream that fails on its third token (a tokenizer bug, a bad byte...)."""

    def __init__(self):
        super().__init__(None)
        self.n = 0

    def push(self, token):
        self.n += 1
        if self.n == 3:
            raise ValueError("this tokenizer cannot decode that")
        return "", False

    def close(self):
        return ""


def test_a_detokenizer_error_ends_only_its_request_with_a_typed_error(fused):
    healthy = make_prompts(3, (6, 10, 4))
    odd = make_prompts(103, (7,))[0]
    ref = [fused.generate_ids(p, max_new_tokens=NEW, ignore_eos=True) for p in healthy]
    gate = threading.Event()
    with Scheduler(fused, SchedulerConfig(max_batch=8)) as sched:
        sched.engine = Poison(sched.engine, sched, odd, "none", gate)
        handles = [sched.submit(p, max_new_tokens=NEW, ignore_eos=True) for p in healthy]
        bad = sched.submit(odd, max_new_tokens=NEW, ignore_eos=True)
        bad._token.text = Exploding()  # before any forward runs (the gate is shut)
        gate.set()
        outs = [tokens(h) for h in handles]
        with pytest.raises(GenerationError, match="ValueError: this tokenizer cannot decode that") as err:
            tokens(bad)
        stats = sched.stats()
    assert outs == ref, f"{TAG} healthy requests changed beside a failing detokenizer"
    assert isinstance(err.value.__cause__, ValueError)
    assert (stats.requests_failed, stats.requests_finished, stats.blocks_used) == (1, 3, 0), f"{TAG} {stats}"


def test_a_tiny_temperature_is_greedy_in_the_scheduler_beside_others(fused):
    """temperature=1e-300 once overflowed the logits to inf and failed every request in its step."""
    ps = make_prompts(4, (5, 11, 8))
    kws = [dict(), dict(temperature=1e-300, seed=3), dict(temperature=0.8, top_p=0.9, seed=7)]
    ref = [fused.generate_ids(p, max_new_tokens=NEW, ignore_eos=True, **kw) for p, kw in zip(ps, kws)]
    greedy = fused.generate_ids(ps[1], max_new_tokens=NEW, ignore_eos=True)
    with Scheduler(fused, SchedulerConfig(max_batch=4)) as sched:
        handles = [sched.submit(p, max_new_tokens=NEW, ignore_eos=True, **kw) for p, kw in zip(ps, kws)]
        outs = [tokens(h) for h in handles]
        stats = sched.stats()
    assert outs == ref and outs[1] == greedy, f"{TAG} {outs} != {ref}"
    assert stats.requests_failed == 0
