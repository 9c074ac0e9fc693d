"""The shipped KV row-moving graph (portable_infer/graphs) and RowMover, run here on the CPU
(the scheduler uses it on GPUs, where rows would otherwise go through the host)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from portable_infer.engine.rows import GRAPHS, RowMover


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_the_shipped_graphs_are_what_the_exporter_builds(dtype):
    runtime_graphs = pytest.importorskip("exporters.runtime_graphs")
    assert (GRAPHS / f"kv_rows.{dtype}.onnx").read_bytes() == runtime_graphs.kv_rows_model(dtype), \
        "stale: run python -m exporters.runtime_graphs"


class CpuSession:
    """Just what RowMover reads of a model session."""

    def get_providers(self):
        return ["CPUExecutionProvider"]

    def get_provider_options(self):
        return {"CPUExecutionProvider": {}}


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_rows_land_in_place_and_the_rest_is_untouched(dtype):
    rng = np.random.default_rng()
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
        mover.copy(dst_v, [0], src_v, 0)  # into a smaller capacity
    np.testing.assert_array_equal(mover.fetch(src_v, [1, 2], 5), src[[1, 2], :, :5])  # to the host, cropped
