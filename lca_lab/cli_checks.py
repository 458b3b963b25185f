"""Checks of the raw command line made before Hydra composes anything (one line instead of Hydra's
several-line error with a stack-trace hint)."""

from __future__ import annotations

import re
from pathlib import Path

__all__ = ["check_group_choices", "config_dirs"]


def _split_list(value: str) -> list[str]:
    """``[a,b]`` / ``a`` → ``["a", "b"]`` / ``["a"]``, quotes stripped."""
    value = value.strip()
    if value.startswith("[") and value.endswith("]"):
        value = value[1:-1]
    return [v.strip().strip("'\"") for v in value.split(",") if v.strip()]


def config_dirs(argv: list[str], conf_dir: Path) -> list[Path] | None:
    """The config directories Hydra will search for this command line: lca_lab's ``conf_dir``, then
    ``--config-dir DIR`` / ``-cd DIR`` / ``--config-dir=DIR`` and the ``file://`` entries of
    ``hydra.searchpath=[...]``. None when a search path entry cannot be looked into here (``pkg://``)."""
    dirs = [Path(conf_dir)]
    for i, arg in enumerate(argv):
        if arg in ("--config-dir", "-cd") and i + 1 < len(argv):
            dirs.append(Path(argv[i + 1]).expanduser())
        elif arg.startswith("--config-dir="):
            dirs.append(Path(arg.split("=", 1)[1]).expanduser())
        elif arg.lstrip("+").startswith("hydra.searchpath="):
            for entry in _split_list(arg.split("=", 1)[1]):
                if entry.startswith("file://"):
                    dirs.append(Path(entry[len("file://") :]).expanduser())
                else:
                    return None
    return dirs


def check_group_choices(argv: list[str], conf_dir: Path) -> str | None:
    """The first ``group=option`` command-line override naming a config file that does not exist
    (e.g. ``experiment=tabel1``), as a one-line message listing the valid options; else None.

    Options are the ``*.yaml`` files of ``<dir>/<group>/`` in lca_lab's ``conf_dir`` and in the user's
    config directories (``hydra.searchpath=[file://DIR]``, ``--config-dir DIR``), so ``DIR/net/mine.yaml``
    makes ``net=mine`` valid. Only plain values and comma-separated sweep lists are checked; Hydra's
    sweep functions (``choice(...)``, ``glob(...)``), ``pkg://`` search paths and anything else are left to
    Hydra.
    """
    dirs = config_dirs(argv, conf_dir)
    if dirs is None:
        return None
    groups = {p.name for d in dirs if d.is_dir() for p in d.iterdir() if p.is_dir()}
    skip_next = False
    for arg in argv:
        if skip_next:
            skip_next = False
            continue
        if arg in ("--config-dir", "-cd", "--config-path", "-cp", "--config-name", "-cn"):
            skip_next = True
            continue
        if "=" not in arg or arg.startswith("-"):
            continue
        key, value = arg.split("=", 1)
        key = key.lstrip("+~")
        if key not in groups or not value or "(" in value or value == "null":
            continue
        options = sorted({p.stem for d in dirs for p in (d / key).glob("*.yaml")})
        for v in value.split(","):
            if v.strip() not in options:
                where = ", ".join(f"{d / key}/" for d in dirs[1:] if (d / key).is_dir())
                return (
                    f"{key}={v.strip()} does not exist; choose one of: {', '.join(options)} "
                    f"(conf/{key}/{', ' + where if where else ''}; a file of your own: "
                    f"hydra.searchpath=[file://DIR] with DIR/{key}/<name>.yaml)"
                )
    return None


def upsert_new_target_keys(args: list[str]) -> list[str]:
    """``+data.root=imgs/`` as ``++data.root=imgs/`` when the same command line replaces ``data._target_``.

    ``+key=value`` adds a key and Hydra refuses it when the group file already has one (the default
    ``data=mnist`` has ``root``); for the arguments of a new target that distinction means nothing, so the
    key is added or set. Every other argument is returned unchanged.
    """
    replaced = {m.group(1) for a in args if (m := re.match(r"^\+{0,2}(\w+)\._target_=", a))}
    out = []
    for a in args:
        m = re.match(r"^\+(\w+)\.", a)
        out.append("+" + a if m and not a.startswith("++") and m.group(1) in replaced else a)
    return out
