"""The Memory-R+ reward math: arrays in, arrays out, no memory or index inside.

Owns `exploit_scores` (−‖a − mean(B)‖₂), `explore_scores` (1 − max cos(a, v)) and `window_normalise` (min-max over
the last `window` raw scores), each with a doctest worked by hand. Imports numpy only.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# _no_blas: the products here are small ([16, ~500] x [~500, 384]) and run while torch holds the cores; numpy's
# multi-threaded BLAS then stalls (measured 20-190 ms instead of 0.3 ms on 2 busy cores), so they use einsum,
# which is single-threaded and steady (~2 ms at that size).


def exploit_scores(answers: np.ndarray, values: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Raw exploit `−‖a − mean(B)‖₂` per answer, B = the rows of `values` that `mask` selects for it.

    answers [n, D], values [R, D], mask [n, R] bool → (scores [n] float64, recalled [n] bool); an empty B gives
    score 0 and recalled False.

    >>> a = np.array([[1.0, 0.0]])
    >>> v = np.array([[0.0, 1.0], [0.0, -1.0], [1.0, 0.0]])
    >>> exploit_scores(a, v, np.array([[True, True, False]]))[0]  # mean (0, 0): −‖(1, 0)‖ = −1
    array([-1.])
    >>> exploit_scores(a, v, np.array([[False, False, False]]))
    (array([0.]), array([False]))
    """
    a = np.asarray(answers, dtype=np.float64)  # [n, D]
    v = np.asarray(values, dtype=np.float64).reshape(-1, a.shape[1])  # [R, D]
    m = np.asarray(mask, dtype=np.float64).reshape(len(a), len(v))  # [n, R]
    count = m.sum(1)  # [n]
    mean = np.einsum("nr,rd->nd", m, v) / np.maximum(count, 1.0)[:, None]  # [n, D] (einsum: see _no_blas)
    recalled = count > 0  # [n]
    return np.where(recalled, -np.linalg.norm(a - mean, axis=1), 0.0), recalled


def explore_scores(answers: np.ndarray, values: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Raw explore `1 − max_{v ∈ B} cos(a, v)` per answer, in float64 with true cosines (§9.7, §9.10).

    answers [n, D], values [R, D], mask [n, R] bool → (scores [n] float64 in [0, 2], recalled [n] bool); an
    empty B gives score 0 and recalled False.

    >>> a = np.array([[1.0, 0.0]])
    >>> v = np.array([[0.0, 2.0], [3.0, 3.0]])  # cos 0 and cos 0.7071…
    >>> float(np.round(explore_scores(a, v, np.array([[True, True]]))[0][0], 4))
    0.2929
    """
    a = np.asarray(answers, dtype=np.float64)  # [n, D]
    v = np.asarray(values, dtype=np.float64).reshape(-1, a.shape[1])  # [R, D]
    m = np.asarray(mask, dtype=bool).reshape(len(a), len(v))  # [n, R]
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-300)  # [n, D]
    v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-300)  # [R, D]
    cos = np.where(m, np.einsum("nd,rd->nr", a, v), -np.inf)  # [n, R] (einsum: see _no_blas)
    best = cos.max(1, initial=-np.inf)  # [n]
    recalled = m.any(1)  # [n]
    return np.where(recalled, np.clip(1.0 - best, 0.0, 2.0), 0.0), recalled


def window_normalise(history: Sequence[float], raw: np.ndarray, size: int = 100, eps: float = 1e-8,
                     tol: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """Push `raw` scores one by one into a window of the last `size` raw scores and min-max normalise each.

    Score j is normalised against the window that ends with it: `(r − min) / (max − min + eps)`, clipped to
    [0, 1]; 0 when the window spans less than `tol` (fewer than two distinct values, float noise included).
    history [H] (oldest first), raw [M] → (normalised [M], new history [≤ size]).

    >>> window_normalise([], np.array([5.0, 5.0, 7.0, 6.0]), size=3)[0]  # windows [5] [5 5] [5 5 7] [5 7 6]
    array([0. , 0. , 1. , 0.5])
    """
    hist = np.asarray(history, dtype=np.float64)[-size:]  # [H]
    seq = np.concatenate([hist, np.asarray(raw, dtype=np.float64)])  # [H + M]
    if len(seq) == len(hist):
        return np.zeros(0), hist
    padded = np.concatenate([np.full(size - 1, np.nan), seq])  # [size - 1 + H + M]
    windows = np.lib.stride_tricks.sliding_window_view(padded, size)[len(hist):]  # [M, size]
    lo, hi = np.nanmin(windows, axis=1), np.nanmax(windows, axis=1)  # [M]
    spread = hi - lo  # [M]
    live = spread > tol  # [M] degenerate windows give 0
    out = np.clip((seq[len(hist):] - lo) / np.where(live, spread + eps, 1.0), 0.0, 1.0)  # [M]
    return np.where(live, out, 0.0), seq[-size:]
