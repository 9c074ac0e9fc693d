"""The caller's left-padded masks when rows join or leave a batch (the same for every cache).

Rows of different lengths share one mask right-aligned, padding on the left; positions come from
``cumsum(mask) - 1``, so padding changes nothing for the real tokens::

    batch (length 5)         newcomer (length 3)      stacked (length 5)
    mask 0 1 1 1 1           mask 1 1 1          ->   mask 0 1 1 1 1
    mask 1 1 1 1 1                                    mask 1 1 1 1 1
                                                      mask 0 0 1 1 1

When rows leave, columns that are padding in every remaining row are cut off again.
"""

from __future__ import annotations

import numpy as np


def stack(a_mask: np.ndarray, a_length: int, b_mask: np.ndarray, b_length: int) -> np.ndarray:
    """``b_mask``'s rows under ``a_mask``'s, both right-aligned in ``max(a_length, b_length)`` columns."""
    width = max(a_length, b_length)
    a_rows = a_mask.shape[0]
    mask = np.zeros((a_rows + b_mask.shape[0], width), np.int64)
    mask[:a_rows, width - a_length:] = a_mask
    mask[a_rows:, width - b_length:] = b_mask
    return mask


def keep_rows(mask: np.ndarray, keep: list) -> tuple:
    """``(mask, start)``: rows ``keep`` of ``mask`` from ``start``, its first column that is not
    padding in all of them (the columns before it are cut off)."""
    sub = mask[keep]
    live = np.flatnonzero(sub.any(axis=0))
    start = int(live[0]) if live.size else sub.shape[1]
    return np.ascontiguousarray(sub[:, start:]), start
