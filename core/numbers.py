"""The one "is this a finite number" test (bools are not numbers here)."""

from __future__ import annotations

import math
import numbers
from typing import Any


def plain_value(value: Any) -> Any:
    """`value` as a plain JSON value: numpy/pandas scalars unwrapped, NaN, inf and pandas' missing
    markers as None (JSON has no NaN)."""
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        try:
            value = value.item()
        except (ValueError, TypeError):
            pass
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value) if is_finite_number(value) else None
    try:
        import pandas as pd

        if pd.isna(value):
            return None
    except (TypeError, ValueError, ImportError):
        pass
    return str(value)


def is_finite_number(value: Any) -> bool:
    """True for a real number (Python or numpy) that is neither NaN nor infinite; False for bools,
    None, strings and everything else."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    try:
        return math.isfinite(value)
    except (OverflowError, TypeError):  # an int too large for a float
        return False
