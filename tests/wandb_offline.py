"""Read back what an offline W&B run wrote (wandb 0.31 has no public reader for offline runs).

``run-<id>.wandb`` is a LevelDB-style log: a 7-byte header (``:W&B``, magic 0xBEE1, version 0), then
32 KiB blocks of records, each ``crc32c (4) | length (2, little-endian) | type (1)`` followed by the
payload; type 1 = a whole record, 2/3/4 = first/middle/last piece of one split across blocks. Every
payload is a ``wandb_internal_pb2.Record`` protobuf.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32 * 1024
HEADER = 7


def records(path: str | Path):
    """Yield every ``Record`` in an offline ``.wandb`` file, in order."""
    data = Path(path).read_bytes()
    if data[:4] != b":W&B" or struct.unpack("<H", data[4:6])[0] != 0xBEE1:
        raise ValueError(f"{path} is not a W&B log file")
    pos, pieces = HEADER, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # block trailer: padding
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if n == 0 and kind == 0:  # zero padding to the end of the block
            pos += left
            continue
        payload = data[pos + 7 : pos + 7 + n]
        pos += 7 + n
        if kind == 1:
            whole = payload
        elif kind == 2:
            pieces = payload
            continue
        elif kind == 3:
            pieces += payload
            continue
        elif kind == 4:
            whole, pieces = pieces + payload, b""
        else:
            raise ValueError(f"bad record type {kind} in {path}")
        rec = pb.Record()
        rec.ParseFromString(whole)
        yield rec


def _key(item) -> str:
    return "/".join(item.nested_key) if item.nested_key else item.key


def read_run(run_dir: str | Path, wait: float = 20.0) -> dict[str, Any]:
    """Like :func:`_read_run`, waiting up to ``wait`` seconds for the run and exit records: wandb-core
    writes the file asynchronously, so right after ``finish()`` its last records may not be on disk yet,
    and a record still being written does not parse."""
    deadline = time.monotonic() + wait
    while True:
        try:
            out = _read_run(run_dir)
        except Exception:  # a record being written (a DecodeError on its partial bytes): read again
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
            continue
        if (out["exit_code"] is not None and "id" in out) or time.monotonic() > deadline:
            return out
        time.sleep(0.2)


def _read_run(run_dir: str | Path) -> dict[str, Any]:
    """An offline run directory (``…/wandb/offline-run-<time>-<id>``) as a dict: ``id``, ``project``,
    ``group``, ``job_type``, ``name``, ``config`` (decoded), ``history`` (list of row dicts), ``summary``
    (last value per key), ``exit_code`` (None if the run never finished), ``artifacts`` (names)."""
    run_dir = Path(run_dir)
    (log,) = run_dir.glob("run-*.wandb")
    out: dict[str, Any] = {"history": [], "summary": {}, "exit_code": None, "artifacts": [], "config": {}}
    for rec in records(log):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            r = rec.run
            out.update(id=r.run_id, project=r.project, group=r.run_group, job_type=r.job_type,
                       name=r.display_name)  # fmt: skip
            out["config"].update({_key(i): json.loads(i.value_json) for i in r.config.update})
        elif kind == "config":
            out["config"].update({_key(i): json.loads(i.value_json) for i in rec.config.update})
        elif kind == "history":
            out["history"].append({_key(i): json.loads(i.value_json) for i in rec.history.item})
        elif kind == "summary":
            out["summary"].update({_key(i): json.loads(i.value_json) for i in rec.summary.update})
        elif kind == "exit":
            out["exit_code"] = rec.exit.exit_code
        elif kind == "artifact":
            out["artifacts"].append(rec.artifact.name)
    return out


def offline_runs(root: str | Path) -> list[Path]:
    """Every offline run directory under ``root``."""
    return sorted(p.parent for p in Path(root).rglob("offline-run-*/run-*.wandb"))
