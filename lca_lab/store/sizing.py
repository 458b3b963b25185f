"""``store.per_param``: whether a run file holds per-parameter rows (``lca/param`` [T, K] float32).

``true`` stores them (a run whose file would exceed ``store.max_gb`` is refused by the caller), ``false``
does not, ``auto`` (the default) stores them when the run file with them fits ``store.max_gb`` and
otherwise keeps per-layer LCA and the reducers only, which never need the per-parameter rows. The
per-parameter rows dominate the file (4·T·K bytes), so for a large model they are what ``auto`` drops.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from ..config import ConfigError
from ..schema import AUTO

__all__ = ["resolve_per_param"]


def resolve_per_param(
    setting: bool | str,
    max_gb: float,
    estimate: Callable[[bool], int],
    held: bool | None = None,
    keep: str | None = None,
) -> tuple[bool, str | None]:
    """Resolve ``store.per_param`` → (per-parameter rows stored?, the one-line note to show, or None).

    Args:
        setting: ``True``, ``False`` or ``"auto"``.
        max_gb: ``store.max_gb`` (GB, 1e9 bytes).
        estimate: the run file's estimated size in bytes with (``True``) or without (``False``)
            per-parameter rows (e.g. :func:`lca_lab.store.estimate_bytes` of the run); called only
            for ``auto``.
        held: for a resumed run, whether its run file already has ``lca/param`` (None: a new run).
            ``auto`` then continues as the file started; an explicit value that contradicts the file is
            refused (``ConfigError``), since a file cannot gain or lose a per-row dataset midway.
        keep: the settings that keep the rows anyway, for the note (default: ``store.per_param=true
            store.max_gb=<the estimate, rounded up>``).

    ``auto`` drops the rows only when the estimate with them is over ``max_gb``; the note then names
    the estimated size, ``max_gb`` and how to keep the rows anyway.
    """
    if setting != AUTO and not isinstance(setting, bool):
        raise ConfigError(f"store.per_param must be true or false (or auto), got {setting!r}")
    if held is not None:
        if setting != AUTO and setting != held:
            has = "has" if held else "has no"
            raise ConfigError(
                f"cannot continue with store.per_param={str(setting).lower()}: the run file {has} "
                f"per-parameter rows (lca/param) from its start; continue with store.per_param=auto"
            )
        return held, None
    if setting != AUTO:
        return setting, None
    size = estimate(True)
    if size <= max_gb * 1e9:
        return True, None
    if keep is None:
        need = math.ceil(size / 1e9 * 1.05)  # a margin over the estimate (it is within a few percent)
        keep = f"store.per_param=true store.max_gb={need}"
    note = (
        f"store.per_param=auto: with per-parameter rows (lca/param) the run file would be "
        f"{size / 1e9:.3g} GB, over store.max_gb={max_gb}; storing per-layer LCA and the reducers only "
        f"(to keep them: {keep})"
    )
    return False, note
