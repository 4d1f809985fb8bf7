"""The largest per-device batch that fits: doubling, then bisection (few compiles).

`largest_fitting` assumes ``fits`` is monotone (a larger batch never needs less memory) and
calls it O(log n) times; `jax_unlearn.plan.planner.plan_run` gives it a compile per call.
"""

from __future__ import annotations

from collections.abc import Callable


def largest_fitting(fits: Callable[[int], bool], unit: int = 1, cap: int = 4096) -> int:
    """The largest ``n`` (a multiple of ``unit``, ``n <= cap``) with ``fits(n)``; 0 when ``unit``
    does not fit. Doubles ``n = unit, 2 unit, 4 unit, ...`` until one does not fit, then bisects
    between the last that fit and the first that did not (in steps of ``unit``).

    >>> calls = []
    >>> largest_fitting(lambda n: calls.append(n) or n <= 37, unit=2)
    36
    >>> calls
    [2, 4, 8, 16, 32, 64, 48, 40, 36, 38]
    """
    if unit < 1 or cap < unit:
        raise ValueError(f"unit={unit} must be >= 1 and <= cap={cap}")
    if not fits(unit):
        return 0
    good, bad = 1, None  # in units
    while bad is None:
        trial = 2 * good
        if trial * unit > cap:
            bad = cap // unit + 1
            break
        if fits(trial * unit):
            good = trial
        else:
            bad = trial
    while bad - good > 1:
        mid = (good + bad) // 2
        if fits(mid * unit):
            good = mid
        else:
            bad = mid
    return good * unit
