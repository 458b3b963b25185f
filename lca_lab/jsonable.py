"""Results (nested dicts, lists, numpy arrays and scalars) → values ``json.dump`` writes as valid JSON."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def jsonable(x: Any) -> Any:
    """Arrays and numpy scalars become lists and Python numbers; NaN and ±inf become ``None`` (JSON null),
    which every JSON reader accepts (``json.dump`` would otherwise write the non-standard ``NaN``)."""
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    if isinstance(x, (np.floating, np.integer)):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x
