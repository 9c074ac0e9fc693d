"""Block-quantized linear layers as the fused graphs emit them, against float matmuls of the
dequantized blocks: GGUF Q4_1 (offsets folded into MatMulNBits), Q4_0, and our asymmetric int4.

Fresh random weights and inputs each run; shapes with a whole and a partial block of block sums.
"""

from __future__ import annotations

import numpy as np
import pytest
from _quant import linear_error, q4_0, q4_1

from exporters.quant import quantize


@pytest.mark.parametrize("shape", [(96, 576), (64, 1536)], ids=["18 blocks", "48 blocks"])
def test_q4_1_offsets_fold_into_one_matmulnbits(shape):
    rng = np.random.default_rng()
    w = rng.standard_normal(shape).astype(np.float32) * 0.05
    w[:3] += 0.2  # rows whose blocks are all positive: the zero point clips at 0
    w[3:6] -= 0.2  # ... and at 15
    x = rng.standard_normal((1, 5, shape[1])).astype(np.float32)
    rel, ops = linear_error(q4_1(w), x, accuracy=1)
    assert ops.count("MatMulNBits") == 1 and "ReduceSum" not in ops and "Add" not in ops, ops
    # measured (max |diff| / max |y|): one 4-bit stage of remainders 6e-3 (1.1e-2 with the clipped
    # rows), two stages (what ships) 4e-4 (0.7-1.5e-3), three 2e-5; float rounding alone ~1e-6
    assert rel < 4e-3, f"Q4_1 through MatMulNBits is {rel:.1e} from the dequantized matmul"


@pytest.mark.parametrize("make", [q4_0, lambda w: quantize(w, 4)], ids=["q4_0", "int4"])
def test_integer_zero_points_are_exact(make):
    rng = np.random.default_rng()
    w = rng.standard_normal((80, 576)).astype(np.float32) * 0.05
    x = rng.standard_normal((1, 3, 576)).astype(np.float32)
    rel, ops = linear_error(make(w), x, accuracy=1)
    assert ops == ["MatMulNBits", "Identity"], ops
    assert rel < 1e-5, rel


def test_q4_1_at_accuracy_4_stays_near():
    """int8 activations: near the float result, not equal (what the -int8 twins trade)."""
    rng = np.random.default_rng()
    w = rng.standard_normal((96, 576)).astype(np.float32) * 0.05
    x = rng.standard_normal((1, 4, 576)).astype(np.float32)
    rel, _ = linear_error(q4_1(w), x, accuracy=4)
    assert 0 < rel < 3e-2, rel
