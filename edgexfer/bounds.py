"""One rule for "within the bound", wherever an accuracy drop or a rate is judged (the guard, evaluate, the
report's checks): a figure exactly at the bound is within it. Accuracies are sums of 1/n, so a drop of one
image in a hundred against a 0.01 bound can come out a hair above 0.01 in floating point; EPS absorbs that."""
from __future__ import annotations

EPS = 1e-9


def within(value: float, bound: float) -> bool:
    """value <= bound, counting a value at the bound in (a drop, a disagreement rate, against its maximum)."""
    return value <= bound + EPS


def at_least(value: float, limit: float) -> bool:
    """value >= limit, counting a value at the limit in (an agreement against its minimum)."""
    return value >= limit - EPS
