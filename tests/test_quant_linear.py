"""Block-quantized linear layers as the fused graphs emit them, against float matmuls of the
dequantized blocks: GGUF Q4_1 (exact offsets with float activations, folded into MatMulNBits with
int8 ones), Q4_0, and our asymmetric int4.

Fresh random weights and inputs each run; shapes with a whole and a partial block of block sums.
"""

from __future__ import annotations

import numpy as np
import pytest
from _quant import linear_error, q4_0, q4_1

from exporters.quant import quantize


def _q4_1_case(shape, rng):
    w = rng.standard_normal(shape).astype(np.float32) * 0.05
    w[:3] += 0.2  # rows whose blocks are all positive: the zero point clips at 0
    w[3:6] -= 0.2  # ... and at 15
    return q4_1(w), rng.standard_normal((1, 5, shape[1])).astype(np.float32)


@pytest.mark.parametrize("shape", [(96, 576), (64, 1536)], ids=["18 blocks", "48 blocks"])
def test_q4_1_offsets_are_exact_with_float_activations(shape):
    """The exact graphs (accuracy 1) add Q4_1's offsets as the float term blocksum(x) @ m."""
    blocks, x = _q4_1_case(shape, np.random.default_rng())
    rel, ops = linear_error(blocks, x, accuracy=1)
    assert ops.count("MatMulNBits") == 1 and "ReduceSum" in ops and "Add" in ops, ops
    assert rel < 1e-5, f"Q4_1 through MatMulNBits is {rel:.1e} from the dequantized matmul"


@pytest.mark.parametrize("shape", [(96, 576), (64, 1536)], ids=["18 blocks", "48 blocks"])
def test_q4_1_offsets_fold_into_one_matmulnbits_with_int8_activations(shape):
    """The int8-activation twins (accuracy 4) fold them into remainder rows of one MatMulNBits.
    Measured on the weights alone (max |diff| / max |y|, float activations): one 4-bit stage of
    remainders 6e-3 (1.1e-2 with the clipped rows), two stages (what ships) 4e-4 (0.7-1.5e-3),
    three 2e-5; here int8 activations add their own error."""
    blocks, x = _q4_1_case(shape, np.random.default_rng())
    rel, ops = linear_error(blocks, x, accuracy=4)
    assert ops.count("MatMulNBits") == 1 and "ReduceSum" not in ops and "Add" not in ops, ops
    assert 0 < rel < 3e-2, rel


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
