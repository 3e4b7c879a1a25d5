"""The thin-network Pareto curve and its value at a given MAC count.

The curve is the set of thin points no other thin point beats (fewer or equal MACs *and* higher
or equal top-1), joined by straight segments in log(MACs): between two curve points at m0 < m1
with top-1 a0, a1, the value at m is `a0 + (a1 - a0) * log(m / m0) / log(m1 / m0)`. Outside the
curve's MAC range it is not extrapolated, except that a point within `tolerance` (relative) of
an end takes that end's value (marked "nearest"): "equal MACs" within the tolerance that
tools/prune.py reaches.
"""
from __future__ import annotations

import math
from typing import Iterable

EXACT, INTERPOLATED, NEAREST = "exact", "interpolated", "nearest"


def pareto_front(points: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (x, top1) points no other point dominates, sorted by x with top-1 strictly rising.

    A point is dominated when another has x <= its x and top-1 >= its top-1 (one strictly);
    of two identical points one is kept.
    """
    front: list[tuple[float, float]] = []
    # By x, the best first at equal x: a point is on the front iff it beats every point before.
    for x, acc in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or acc > front[-1][1]:
            front.append((x, acc))
    return front


def curve_value(front: list[tuple[float, float]], x: float, tolerance: float = 0.05
                ) -> tuple[float | None, str]:
    """The curve's top-1 at `x` and how it was obtained.

    Returns:
        (value, EXACT) at a curve point; (value, INTERPOLATED) between two, linear in log(x);
        (end value, NEAREST) within `tolerance` outside the range; (None, reason) otherwise.
    """
    if not front:
        return None, "no thin points"
    if not x > 0:
        raise ValueError(f"x must be > 0, got {x}")
    (x0, a0), (xn, an) = front[0], front[-1]
    # The miss measured from the curve end on both sides, as tools/prune.py measures it from its
    # target (|macs / target - 1|): x0 / x - 1 refused a point 4.9 % below that prune accepts.
    if x < x0:
        return (a0, NEAREST) if 1 - x / x0 <= tolerance else (None, "below the thin range")
    if x > xn:
        return (an, NEAREST) if x / xn - 1 <= tolerance else (None, "above the thin range")
    for (xa, aa), (xb, ab) in zip(front, front[1:]):
        if xa <= x <= xb:
            if x == xa:
                return aa, EXACT
            if x == xb:
                return ab, EXACT
            t = math.log(x / xa) / math.log(xb / xa)
            return aa + t * (ab - aa), INTERPOLATED
    return a0, EXACT  # a single-point curve at exactly x


def curve_points(front: list[tuple[float, float]], x: float, how: str
                 ) -> list[tuple[float, float]]:
    """The curve points `curve_value(front, x)` took its value from (`how` is what it
    returned): the one point for EXACT and NEAREST, the two around `x` for INTERPOLATED."""
    if how == NEAREST:
        return [front[0] if x < front[0][0] else front[-1]]
    if how == EXACT:
        return [next((f for f in front if f[0] == x), front[0])]
    if how == INTERPOLATED:
        return next([a, b] for a, b in zip(front, front[1:]) if a[0] <= x <= b[0])
    return []
