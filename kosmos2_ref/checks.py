"""Type tests shared by the input checks at the library's boundaries.

Python's bool is a subclass of int (and JSON's true arrives as True), so ``isinstance(True, int)`` holds: a flag
passed where a count or an id is expected would otherwise be taken as 1. NumPy's scalars count as numbers here
(``numbers.Integral`` / ``numbers.Real`` include them); ``np.bool_`` does not.
"""
from __future__ import annotations

import numbers


def is_int(v) -> bool:
    """An integer, Python's or NumPy's, and not a bool."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def is_real(v) -> bool:
    """A real number (integer or float), Python's or NumPy's, and not a bool."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool)
