"""The one value check every benchmark config section repeats."""

from __future__ import annotations


def require_positive(values: dict[str, float], what: str = "a positive integer") -> None:
    """Raises ValueError ``"KEY must be WHAT, got VALUE"`` for the first value that is not > 0."""
    for key, value in values.items():
        if not value > 0:
            raise ValueError(f"{key} must be {what}, got {value}")
