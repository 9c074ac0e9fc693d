"""The graphs the runtime ships (portable_infer/engine/graphs) and their users, run here on the CPU:
RowMover (the scheduler moves KV rows with it on GPUs, where they would otherwise go through the
host) and MaskedArgmax (greedy picks under grammar masks where the logits are), each against numpy.
Seeds are printed; rerun one with ``KV_ROWS_SEED=<seed>``."""

from __future__ import annotations

import os
import random

import numpy as np
import onnxruntime as ort
import pytest

from portable_infer.decode.masks import allows, allows_each
from portable_infer.engine.companion import GRAPHS
from portable_infer.engine.device_logits import DeviceLogits
from portable_infer.engine.masked_argmax import MaskedArgmax
from portable_infer.engine.rows import RowMover

SEED = int(os.environ.get("KV_ROWS_SEED") or random.SystemRandom().randrange(2**31))
TAG = f"[KV_ROWS_SEED={SEED}]"


def test_the_shipped_graphs_are_what_the_exporter_builds():
    runtime_graphs = pytest.importorskip("exporters.runtime_graphs")
    built = runtime_graphs.shipped()
    assert {"kv_rows.float32.onnx", "kv_rows.float16.onnx", "masked_argmax.onnx", "masked_rows.onnx"} <= set(built)
    assert sorted(p.name for p in GRAPHS.glob("*.onnx")) == sorted(built), "a shipped graph nothing builds"
    for name, data in built.items():
        assert (GRAPHS / name).read_bytes() == data, f"{name} is stale: run python -m exporters.runtime_graphs"


class CpuSession:
    """Just what RowMover reads of a model session."""

    def get_providers(self):
        return ["CPUExecutionProvider"]

    def get_provider_options(self):
        return {"CPUExecutionProvider": {}}


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_rows_land_in_place_and_the_rest_is_untouched(dtype):
    rng = np.random.default_rng(SEED)
    print(TAG)
    src = rng.standard_normal((3, 2, 8, 4)).astype(dtype)
    dst = np.full((5, 2, 16, 4), 7.0, dtype)
    src_v, dst_v = ort.OrtValue.ortvalue_from_numpy(src), ort.OrtValue.ortvalue_from_numpy(dst)
    mover = RowMover(CpuSession(), ort, dtype, "CPUExecutionProvider")
    mover.copy(src_v, [2, 0], dst_v, 1)
    out = dst_v.numpy()
    np.testing.assert_array_equal(out[1:3, :, :8], src[[2, 0]])
    assert not out[1:3, :, 8:].any()  # a grown capacity's tail is zeros
    assert (out[[0, 3, 4]] == 7).all()  # rows outside the target keep their values
    with pytest.raises(ValueError, match="cannot move rows"):
        mover.copy(dst_v, [0], src_v, 0)  # into a smaller capacity, the tokens held unknown
    with pytest.raises(ValueError, match="they hold 9 tokens"):
        mover.copy(dst_v, [1], src_v, 0, used=9)  # more than the smaller rows take
    mover.copy(dst_v, [1], src_v, 0, used=8)  # shorter rows that take what the row holds: its first 8 tokens
    np.testing.assert_array_equal(src_v.numpy()[0], src[2])
    np.testing.assert_array_equal(mover.fetch(src_v, [1, 2], 5), src[[1, 2], :, :5])  # to the host, cropped


@pytest.mark.parametrize("vocab", [256, 49152, 70, 33])  # whole words, and a last word part-used
def test_masked_argmax_equals_numpy(vocab):
    """Each row's argmax among the tokens its bitmask allows (bit v % 32 of word v // 32), first
    index on ties, and the fetched rows' masked logits, against numpy; rows all allowed, none
    allowed, one allowed (bit 31: the sign bit of an int32 word), random."""
    rng = np.random.default_rng(SEED + vocab)
    print(TAG)
    batch, words = 6, -(-vocab // 32)
    logits = rng.standard_normal((batch, 1, vocab)).astype(np.float32)
    logits[5, 0, :] = np.round(logits[5, 0, :])  # ties
    bitmask = rng.integers(-2**31, 2**31, (batch, words)).astype(np.int32)
    bitmask[0], bitmask[1], bitmask[2] = -1, 0, 0
    lone = int(rng.integers(0, vocab // 32)) * 32 + 31  # the sign bit of some word
    bitmask[2, lone // 32] = np.int32(-2**31)
    allowed = np.unpackbits(bitmask.view(np.uint8), axis=1, count=vocab, bitorder="little").astype(bool)
    masked = np.where(allowed, logits[:, 0], -np.inf)
    want = masked.argmax(axis=1)
    assert want[2] == lone and want[1] == 0
    rows = rng.permutation(batch)[:3]
    picker = MaskedArgmax(CpuSession(), ort)
    picked = DeviceLogits(ort.OrtValue.ortvalue_from_numpy(logits), None, lambda: picker, True)
    token, fetched = picked.pick(bitmask, rows)
    np.testing.assert_array_equal(token, want, err_msg=TAG)
    np.testing.assert_array_equal(fetched, masked[rows])
    token, fetched = picked.pick(None, [4])  # no masks: every token allowed
    np.testing.assert_array_equal(token, logits[:, 0].argmax(axis=1))
    np.testing.assert_array_equal(fetched, logits[[4], 0])
    # the host's one-token test reads the same bits (the sign bit too)
    assert allows(bitmask[2], lone) and not allows(bitmask[1], int(want[0]))
    assert all(allows(bitmask[r], t) == allowed[r, t] for r in range(batch) for t in rng.integers(0, vocab, 64))
    for _ in range(8):  # the rows-at-once form (the check mode's): one token per row, any rows
        rows_, toks = rng.integers(0, batch, 5), rng.integers(0, vocab, 5)
        np.testing.assert_array_equal(allows_each(bitmask, rows_, toks), allowed[rows_, toks], err_msg=TAG)
    assert allows_each(bitmask, [2], [lone]).tolist() == [True] and allows_each(bitmask, [], []).shape == (0,)
    assert picked.pick(bitmask, [])[1].shape == (0, vocab)
    with pytest.raises(ValueError, match="bitmask"):
        picked.pick(bitmask[:, :-1], [])  # a word short
    # the lean graph: a few rows (any order), their masks unpacked here
    some = rng.permutation(batch)[:4]
    np.testing.assert_array_equal(picked.pick_rows(some, allowed[some]), want[some], err_msg=TAG)
    assert picked.pick_rows([], allowed[:0]).shape == (0,)
    with pytest.raises(ValueError, match="allowed"):
        picked.pick_rows(some, allowed[some, :-1])
