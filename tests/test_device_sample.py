"""Sampled rows drawn where the logits are (``graphs/sample.onnx``, run here on the CPU), against
the host's sampler on the same logits and the same uniform numbers; the rows whose logits cannot
be sampled come back to the host, which names why. Seeds are printed; rerun one with
``DEVICE_SAMPLE_SEED=<seed>``."""

from __future__ import annotations

import os
import random

import numpy as np
import onnxruntime as ort
import pytest

from portable_infer.decode import batch_pick
from portable_infer.decode.sampling import SamplingParams, draw_filters, make_sampler
from portable_infer.decode.sequence import Sequence
from portable_infer.engine.device_logits import DeviceLogits
from portable_infer.engine.device_sample import DeviceSampler
from portable_infer.errors import GenerationError, InvalidArgumentError

SEED = int(os.environ.get("DEVICE_SAMPLE_SEED") or random.SystemRandom().randrange(2**31))
TAG = f"[DEVICE_SAMPLE_SEED={SEED}]"


class CpuSession:
    """Just what the companion sessions read of a model session."""

    def get_providers(self):
        return ["CPUExecutionProvider"]

    def get_provider_options(self):
        return {"CPUExecutionProvider": {}}


class Fixed:
    """A generator whose next uniform number is given: the host's draw with the device's number."""

    def __init__(self, u):
        self.u = u

    def random(self):
        return self.u


def _configs(vocab):
    return [dict(temperature=0.7), dict(temperature=1.0, top_k=50), dict(temperature=0.7, top_p=0.9),
            dict(temperature=1.3, top_k=40, top_p=0.8), dict(temperature=0.5, min_p=0.05),
            dict(temperature=2.0, top_p=0.95, min_p=0.01), dict(temperature=1.0, top_k=vocab - 1, top_p=0.5),
            dict(temperature=0.9, top_k=1), dict(temperature=1.0, top_k=vocab + 5), dict(temperature=3.0, top_p=0.2)]


@pytest.mark.parametrize("vocab,candidates", [(3000, 1024), (700, 256), (257, 1024), (50000, 1024)])
def test_device_draws_are_the_host_draws(vocab, candidates):
    """Rows of every filter mix, in any order of the batch, with ties (rounded logits) and with
    flat rows whose top-p mass lies past the sorted candidates (run again with the vocabulary
    sorted): each token is the host sampler's with the same uniform number. A number that lands
    within float rounding of a boundary (the device sums in another order) may pick the next
    token: a few in a thousand at most, where a wrong rule misses most draws. (Top-p's running
    sums are float64 on both sides: in float32 a flat row of 50,000 tokens drifted enough to move
    its cut by several tokens.)"""
    rng = np.random.default_rng(SEED + vocab)
    print(TAG)
    sampler = DeviceSampler(CpuSession(), ort, candidates=candidates)
    configs, batch, misses, draws = _configs(vocab), 24, [], 0
    for trial in range(20):
        logits = (rng.standard_normal((batch, 1, vocab)) * rng.uniform(0.3, 5)).astype(np.float32)
        if trial % 4 == 0:
            logits = np.round(logits)  # ties: the lower index first, as the host orders them
        params = [SamplingParams(**configs[int(rng.integers(len(configs)))]) for _ in range(batch)]
        rows = rng.permutation(batch)[:16]
        u = rng.random(rows.size)
        out = DeviceLogits(ort.OrtValue.ortvalue_from_numpy(logits), None, sampler=lambda: sampler)
        tokens = out.sample(rows, draw_filters([params[r] for r in rows]), u)
        for j, r in enumerate(rows):
            host = make_sampler(params[r])(logits[r, 0], Fixed(u[j]))
            draws += 1
            if host != tokens[j]:
                misses.append((trial, params[r], host, int(tokens[j])))
    assert len(misses) <= 3, f"{TAG} {len(misses)} of {draws} device draws differ from the host's: {misses[:4]}"
    assert (sampler.reruns > 0) == (candidates < vocab), f"{TAG} {sampler.reruns} rows ran with the vocabulary sorted"


def test_the_same_row_gives_the_same_token_whatever_the_batch():
    """A row's token depends on its logits, settings and number only: not on the rows beside it
    nor on how many tokens the batch's TopK sorts."""
    rng = np.random.default_rng(SEED + 1)
    print(TAG)
    vocab = 2000
    sampler = DeviceSampler(CpuSession(), ort, candidates=512)
    logits = (rng.standard_normal((12, 1, vocab)) * 2).astype(np.float32)
    params = [SamplingParams(**c) for c in _configs(vocab)] + [SamplingParams(temperature=1.1)] * 2
    u = rng.random(12)
    out = DeviceLogits(ort.OrtValue.ortvalue_from_numpy(logits), None, sampler=lambda: sampler)
    together = out.sample(np.arange(12), draw_filters(params), u)
    alone = [int(out.sample([i], draw_filters([params[i]]), u[i:i + 1])[0]) for i in range(12)]
    assert together.tolist() == alone, TAG


def test_rows_that_cannot_be_sampled_go_to_the_host_which_names_why():
    rng = np.random.default_rng(SEED + 2)
    print(TAG)
    vocab = 300
    logits = rng.standard_normal((6, 1, vocab)).astype(np.float32)
    logits[1, 0, 7] = np.nan
    logits[2, 0, 9] = np.inf
    logits[3, 0, :] = -np.inf
    logits[4, 0, 5] = 3e38  # / temperature 1e-4 overflows float32
    params = [SamplingParams(temperature=0.8, top_p=0.9, seed=1)] * 4 + [SamplingParams(temperature=1e-4, seed=2),
                                                                        SamplingParams(temperature=0.8, seed=3)]
    sampler = DeviceSampler(CpuSession(), ort)
    out = DeviceLogits(ort.OrtValue.ortvalue_from_numpy(logits), None, sampler=lambda: sampler)
    tokens = out.sample(np.arange(6), draw_filters(params), rng.random(6))
    assert tokens[1:5].tolist() == [-1] * 4 and tokens[0] >= 0 and tokens[5] >= 0, TAG
    seqs = [Sequence([3, 4], p) for p in params]
    inputs = batch_pick.row_inputs(batch_pick.SAMPLE, out, seqs, None)
    assert inputs[0].tok is not None and inputs[5].tok is not None
    reasons = []
    for i in (1, 2, 3):
        with pytest.raises(GenerationError) as err:
            inputs[i].step(seqs[i], max_context=64)
        reasons.append(err.value.reason)
    assert reasons == ["nan_logits", "inf_logits", "no_candidates"]
    with pytest.raises(InvalidArgumentError, match="temperature"):
        inputs[4].step(seqs[4], max_context=64)
    # an overlapped step (the next forward starts on these ids): such a row's input is 0, and
    # its pick still raises (the row ends; the extra token it was fed is dropped)
    seqs = [Sequence([3, 4], p) for p in params]
    tokens, picks = batch_pick.device_picks(batch_pick.SAMPLE, out, seqs)
    assert tokens[1:5].tolist() == [0] * 4 and tokens[0] == picks[0].tok and tokens[5] == picks[5].tok, TAG
    with pytest.raises(GenerationError):
        picks[1].step(seqs[1], max_context=64)


def test_a_sample_step_draws_some_rows_there_and_brings_only_the_others_logits():
    """SAMPLE mode: sampling rows drawn on the device, one number each from the row's own
    generator (the host's draw takes one too: a seeded row draws the same tokens either way);
    plain greedy rows take the graph's argmax; rows that read their logits (logprobs, penalties)
    get them, and only theirs come over."""
    rng = np.random.default_rng(SEED + 3)
    print(TAG)
    vocab, batch = 400, 6
    logits = (rng.standard_normal((batch, 1, vocab)) * 3).astype(np.float32)
    argmax = logits[:, 0].argmax(-1)
    params = [SamplingParams(temperature=0.9, top_k=20, seed=5), SamplingParams(seed=1),
              SamplingParams(temperature=0.7, logprobs=2, seed=6), SamplingParams(temperature=0.8, top_p=0.9, seed=7),
              SamplingParams(repetition_penalty=1.3, seed=2), SamplingParams(temperature=1.2, min_p=0.1, seed=8)]
    sampler = DeviceSampler(CpuSession(), ort)
    fetched = []
    real_rows = sampler.rows
    sampler.rows = lambda value, index: fetched.append(list(index)) or real_rows(value, index)
    engine = type("E", (), dict(greedy_on_device=True, masks_on_device=False, samples_on_device=True))()
    device = [Sequence([3], p) for p in params]
    assert batch_pick.mode(engine, device) == batch_pick.SAMPLE
    assert batch_pick.mode(engine, [device[1], device[4]]) != batch_pick.SAMPLE  # nothing to draw there
    out = DeviceLogits(ort.OrtValue.ortvalue_from_numpy(logits), argmax.reshape(-1, 1), sampler=lambda: sampler)
    host = [Sequence([3], p) for p in params]
    for i, inp in enumerate(batch_pick.row_inputs(batch_pick.SAMPLE, out, device, None)):
        got = inp.step(device[i], max_context=64)
        want = host[i].step(logits[i, 0], max_context=64)
        assert got == want, f"{TAG} row {i}: {got} != {want}"
    assert fetched == [[2, 4]], fetched
    assert [s.rng.random() for s in device] == [s.rng.random() for s in host], "the generators drifted apart"


def test_views_and_fetched_rows():
    rng = np.random.default_rng(SEED + 4)
    logits = rng.standard_normal((5, 1, 70)).astype(np.float32)
    sampler = DeviceSampler(CpuSession(), ort)
    out = DeviceLogits(ort.OrtValue.ortvalue_from_numpy(logits), np.arange(5) * 3, sampler=lambda: sampler)
    np.testing.assert_array_equal(out.rows([4, 0]), logits[[4, 0], 0])
    view = out.view([3, -1, 1]).view([2, 0])  # the batch's rows 0, 1 are value's rows 1, 3
    assert view.batch == 2 and view.argmax().tolist() == [3, 9]
    np.testing.assert_array_equal(view.rows([1, 0]), logits[[3, 1], 0])
    with pytest.raises(RuntimeError, match="masked-argmax"):
        view.pick(None)
    assert out.sample([], draw_filters([]), np.empty(0)).shape == (0,)  # a step whose drawing rows all ended


def test_an_engine_draws_on_its_device_only_where_the_graph_proves_itself(monkeypatch, caplog):
    """Off the CPU an engine runs the graph on rows whose tokens are known before it draws there;
    a device where the graph cannot run, or draws other tokens, leaves the draws on the host
    (logged), never a wrong token."""
    from portable_infer.engine.device_sample import DrawsOnDevice

    sampler = DeviceSampler(CpuSession(), ort)
    sampler.prove(ort, "cpu")  # the rule holds where it runs
    real = DeviceSampler.sample
    monkeypatch.setattr(DeviceSampler, "sample", lambda self, *a: real(self, *a)[::-1])
    with pytest.raises(RuntimeError, match="only tokens the rule allows"):
        sampler.prove(ort, "cpu")
    monkeypatch.setattr(DeviceSampler, "sample", real)

    class Engine(DrawsOnDevice):
        session, provider, device = CpuSession(), "CPUExecutionProvider", "nowhere"

    Engine.ort = ort
    engine = Engine()
    engine.start_device_draws()  # no OrtValue can live on "nowhere"
    assert not engine.samples_on_device and "drawn on the host" in caplog.text
