"""The cost–quality Pareto front of a model family (the paper's Fig. 3), as pure functions of points.

A point is a (cost, quality) pair; cost is always lower-is-better (bytes on disk, FLOPs per token),
quality is lower-is-better for a loss and higher-is-better for an accuracy. A point is on the front
when no other point *dominates* it: at most its cost, at least as good in quality, and strictly
better in one of the two. So two identical points are both on the front (neither is strictly
better), and of two points with equal cost only the better-quality one is.

Points whose cost or quality is missing (``None`` or NaN) are not placed: they are neither on nor
off the front (``None`` in `pareto_mask`).

What this module does not do: read run trees, choose which metric is the quality, or draw.
"""

from __future__ import annotations

import math
from typing import Sequence


def _placed(cost: float | None, quality: float | None) -> bool:
    return cost is not None and quality is not None and not math.isnan(cost) and not math.isnan(quality)


def dominates(a: tuple[float, float], b: tuple[float, float], higher_is_better: bool) -> bool:
    """Whether point ``a`` = (cost, quality) dominates ``b``: no worse in both, strictly better in one."""
    (ca, qa), (cb, qb) = a, b
    if not higher_is_better:
        qa, qb = -qa, -qb
    return ca <= cb and qa >= qb and (ca < cb or qa > qb)


def pareto_mask(
    costs: Sequence[float | None], qualities: Sequence[float | None], higher_is_better: bool
) -> list[bool | None]:
    """For each point: True on the front, False dominated, None when cost or quality is missing.

    Quadratic in the number of points on purpose: a family has tens of variants, and the direct
    definition is the one a reader can check.
    """
    if len(costs) != len(qualities):
        raise ValueError(f"{len(costs)} costs but {len(qualities)} qualities")
    points = [(c, q) if _placed(c, q) else None for c, q in zip(costs, qualities)]
    placed = [p for p in points if p is not None]
    return [
        None if p is None else not any(dominates(o, p, higher_is_better) for o in placed)
        for p in points
    ]


def frontier(
    costs: Sequence[float | None], qualities: Sequence[float | None], higher_is_better: bool
) -> list[int]:
    """Indices of the points on the front, by increasing cost (quality improving along it)."""
    mask = pareto_mask(costs, qualities, higher_is_better)
    on = [i for i, m in enumerate(mask) if m]
    sign = -1.0 if higher_is_better else 1.0
    return sorted(on, key=lambda i: (costs[i], sign * qualities[i], i))
