"""The one "is this a finite number" test (bools are not numbers here)."""

from __future__ import annotations

import math
import numbers
from typing import Any


def is_finite_number(value: Any) -> bool:
    """True for a real number (Python or numpy) that is neither NaN nor infinite; False for bools,
    None, strings and everything else."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    try:
        return math.isfinite(value)
    except (OverflowError, TypeError):  # an int too large for a float
        return False
