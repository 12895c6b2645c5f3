"""Allocation: which candidate each layer gets under a byte budget (a multiple-choice knapsack)."""

from __future__ import annotations

from typing import Optional

import numpy as np

from .errors import NonFiniteError

__all__ = ["solve_knapsack"]



def solve_knapsack(costs: np.ndarray, losses: np.ndarray, capacity: int) -> Optional[list[int]]:
    """Pick one candidate per layer minimising the summed loss with summed cost <= capacity.

    ``costs``, ``losses``: ``[layers, K]`` (``inf`` loss marks a missing candidate). Exact, with
    ``scipy.optimize.milp``; ``None`` when infeasible.
    """
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import lil_matrix

    L, K = losses.shape
    if np.isnan(losses).any():
        raise NonFiniteError(f"knapsack losses hold NaN (layer {int(np.argwhere(np.isnan(losses))[0][0])}): a bank entry or the "
                             "output Fisher is not finite")
    valid = np.isfinite(losses)
    idx = np.flatnonzero(valid.ravel())
    n = idx.size
    c = losses.ravel()[idx].astype(float)
    c = c / max(np.abs(c).max(), 1e-30)
    A = lil_matrix((L + 1, n))
    for j, flat in enumerate(idx):
        A[flat // K, j] = 1.0
        A[L, j] = float(costs.ravel()[flat])
    lo = np.concatenate([np.ones(L), [-np.inf]])
    hi = np.concatenate([np.ones(L), [float(capacity)]])
    res = milp(c, constraints=LinearConstraint(A.tocsr(), lo, hi), integrality=np.ones(n), bounds=Bounds(0, 1),
               options={"time_limit": 60})
    if res.x is None:
        return None
    x = np.round(res.x).astype(int)
    choice = [-1] * L
    for j in np.flatnonzero(x):
        flat = idx[j]
        choice[flat // K] = int(flat % K)
    if min(choice) < 0:
        return None
    return choice
