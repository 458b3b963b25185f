"""The run file's writer process (``RunWriter(background=True, file_process=True)``, what ``train.py``
uses on a GPU): the same file as the synchronous writer, errors and a dead child surface and lose no
row, signals meant for the training process leave it alone, and nothing is left behind."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import lca_lab.file_process
import lca_lab.store.buffer as buffer
import lca_lab.store.transport as transport
from lca_lab.store import RowBuffer, RunWriter, WriterThread, open_run

# Two tensors, K = 30,005: a flush of 7 per-parameter rows (840 KB) goes through the shared arena.
NAMES, SHAPES, LAYER, LAYER_NAMES = ["a", "b"], [(30000,), (5,)], [0, 1], ["l0", "l1"]
K = 30005


def _writer(path: Path, process: bool, **kw) -> RunWriter:
    kw.setdefault("flush_every", 7)
    return RunWriter(
        path, param_names=NAMES, param_shapes=SHAPES, param_layer=LAYER, layer_names=LAYER_NAMES,
        attrs={"config": "test"}, background=process, file_process=process, **kw,
    )  # fmt: skip


def _rows(T: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [
        {
            "loss": rng.random(), "total": rng.random(), "error": rng.standard_normal() * 1e-4,
            "splits": int(rng.integers(1, 9)), "converged": bool(rng.random() > 0.3), "layer": rng.random(2),
            "param": rng.standard_normal(K).astype(np.float32),
            "theta": rng.standard_normal(K).astype(np.float32),
            "class_layer": rng.random(6), "big": rng.random(20000),
        }
        for _ in range(T)
    ]  # fmt: skip


def _append(w: RunWriter, rows: list[dict], start: int, stop: int, tensors: bool = False) -> None:
    conv = (lambda x: torch.as_tensor(np.asarray(x))) if tensors else (lambda x: x)  # float64 stays float64
    for t in range(start, stop):
        r = rows[t]
        w.append(
            t, r["loss"], conv(r["total"]), r["error"], r["splits"], r["converged"], conv(r["layer"]),
            conv(r["param"]) if w.per_param else None, conv(r["theta"]) if w.trajectory else None,
            conv(r["class_layer"]) if w.n_classes else None,
        )  # fmt: skip
        w.append_dataset("test/big", r["big"])  # 160 KB rows: through the arena, which may have to grow
        if t % 5 == 0:
            w.append_eval(t, test_loss=float(t), test_acc=r["loss"])


def _datasets(path: Path) -> dict[str, np.ndarray]:
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda n, o: out.__setitem__(n, o[()]) if isinstance(o, h5py.Dataset) else None)
    return out


def _same_files(a: Path, b: Path) -> None:
    da, db = _datasets(a), _datasets(b)
    assert da.keys() == db.keys()
    for k in da:
        np.testing.assert_array_equal(da[k], db[k], err_msg=k)


def _same_as_plain_writer(path: Path, rows: list[dict]) -> None:
    """``path`` equals the file the synchronous writer makes of ``rows`` (written next to it)."""
    ref = _writer(path.with_name("ref.h5"), False)
    ref.write_initial(0.5)
    _append(ref, rows, 0, len(rows))
    ref.close()
    _same_files(path.with_name("ref.h5"), path)


@pytest.mark.parametrize(
    "per_param,trajectory,n_classes", [(True, True, 3), (True, False, None), (False, False, None)]
)
def test_writer_process_writes_the_synchronous_writers_file_and_resumes(
    tmp_path: Path, per_param: bool, trajectory: bool, n_classes: int | None
) -> None:
    rows = _rows(23)
    theta0 = np.ones(K, np.float32)
    for name, process in (("sync.h5", False), ("proc.h5", True)):
        kw = {"per_param": per_param, "trajectory": trajectory, "n_classes": n_classes}
        w = _writer(tmp_path / name, process, **kw)
        w.write_initial(0.5, theta0 if trajectory else None)
        _append(w, rows, 0, 15, tensors=process)
        counts = w.committed_rows()  # a checkpoint: everything so far on disk, counted
        _append(w, rows, 15, 18)  # rows after the checkpoint: dropped by the resume
        w.wait()
        w._finish("running")  # the process ends without close (as at a preemption)
        w = _writer(tmp_path / name, process, resume=counts, **kw)
        _append(w, rows, 15, 23, tensors=process)
        w.close()
    _same_files(tmp_path / "sync.h5", tmp_path / "proc.h5")
    with open_run(tmp_path / "proc.h5") as r:
        assert r.status == "complete" and r.n_rows == 23
        np.testing.assert_array_equal(r.lca_total, [x["total"] for x in rows])
        np.testing.assert_array_equal(r.lca_iteration, np.arange(23))
        if per_param:
            np.testing.assert_array_equal(r.param_lca(), np.stack([x["param"] for x in rows]))
        if trajectory:
            np.testing.assert_array_equal(r.theta(), np.stack([theta0] + [x["theta"] for x in rows]))


def test_writer_process_error_surfaces_at_the_next_flush_and_rows_are_retried(tmp_path: Path) -> None:
    """The child cannot open the file (moved away): the error comes back through the writer thread to the
    training thread's next flush; once the file is back, every queued row is written once."""
    rows = _rows(21)
    path, away = tmp_path / "lca.h5", tmp_path / "away.h5"
    w = _writer(path, True)
    w.write_initial(0.5)
    _append(w, rows, 0, 7)
    w.wait()
    path.rename(away)
    _append(w, rows, 7, 14)  # this flush fails in the child
    concurrent.futures.wait([w.transport.future])
    with pytest.raises(OSError):
        w.flush()
    away.rename(path)
    _append(w, rows, 14, 21)
    w.close()
    _same_as_plain_writer(path, rows)


@pytest.mark.parametrize("when", ["between flushes", "during the write"])
def test_killed_writer_process_is_replaced_and_no_row_is_lost(tmp_path: Path, monkeypatch, when) -> None:
    """A child killed between two flushes (reaped before the next one) or found dead only by the write
    itself: either way the next flush says so, and the one after starts a new child and writes every row.
    Regression: CI (2026-11-27) ran the kill and the next flush far enough apart that the child was
    already reaped, and the flush replaced it without a word; the error now surfaces in both orders."""
    rows = _rows(21)
    path = tmp_path / "lca.h5"
    w = _writer(path, True, trajectory=True)
    w.write_initial(0.5, np.ones(K, np.float32))
    _append(w, rows, 0, 7)
    w.wait()
    first = w.transport.sink.process.pid
    proc = w.transport.sink.process._proc
    os.kill(first, signal.SIGKILL)
    proc.wait(timeout=30)  # dead and reaped
    if when == "during the write":  # the check before the write still sees it alive: the pipe finds out
        monkeypatch.setattr(proc, "poll", lambda: None)
    _append(w, rows, 7, 14)
    concurrent.futures.wait([w.transport.future])
    with pytest.raises(RuntimeError, match="writer process .* exited .*next flush starts a new one"):
        w.flush()
    _append(w, rows, 14, 21)
    w.close()
    assert w.transport.sink.process.pid is None  # closed: the replacement child has exited too
    with open_run(path) as r:
        assert r.status == "complete" and r.n_rows == 21
        np.testing.assert_array_equal(r.param_lca(), np.stack([x["param"] for x in rows]))
        np.testing.assert_array_equal(r.theta()[1:], np.stack([x["theta"] for x in rows]))
        np.testing.assert_array_equal(r.lca_iteration, np.arange(21))


def test_writer_process_ignores_the_training_processs_signals_and_leaves_nothing_behind(
    tmp_path: Path,
) -> None:
    shm = Path("/dev/shm")
    before = set(shm.glob("lca-arena-*")) if shm.is_dir() else set()
    rows = _rows(14)
    w = _writer(tmp_path / "lca.h5", True)
    w.write_initial(0.5)
    _append(w, rows, 0, 7)
    w.wait()
    pid = w.transport.sink.process.pid
    proc = w.transport.sink.process._proc
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):  # Ctrl-C, a preemption's signals
        os.kill(pid, sig)
    time.sleep(0.2)
    assert proc.poll() is None
    _append(w, rows, 7, 14)
    w.close()
    process = w.transport.sink.process
    assert process.pid is None and proc.returncode == 0 and pid == proc.pid  # the same child, ended
    assert (
        set(shm.glob("lca-arena-*")) if shm.is_dir() else set()
    ) == before  # the arena was unlinked at once
    with open_run(tmp_path / "lca.h5") as r:
        assert r.n_rows == 14 and r.status == "complete"


def test_writer_process_module_imports_no_torch() -> None:
    """The child starts in a fraction of a second because it imports numpy and h5py only."""
    root = str(Path(lca_lab.file_process.__file__).resolve().parents[1])
    lines = [
        "import sys",
        f"sys.path.insert(0, {root!r})",
        "import lca_lab.file_process",
        "print('torch' in sys.modules)",
    ]
    code = "\n".join(lines)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_rows_in_flight_are_waited_for_once_per_flush(tmp_path: Path, monkeypatch) -> None:
    """Copies off the device are queued in order on one stream, so the writer thread waits for the last
    one's event only (each wait is a round trip of the GIL); the file is still the plain writer's."""
    waits = []

    class Event:
        def __init__(self, i: int) -> None:
            self.i = i

        def synchronize(self) -> None:
            waits.append(self.i)

    real = buffer.InFlight

    class Flight(real):
        made = 0

        def __init__(self, *a, **k) -> None:
            super().__init__(*a, **k)
            Flight.made += 1
            self.event = Event(Flight.made)

    monkeypatch.setattr(buffer, "can_fly", lambda rows: bool(rows) and all(torch.is_tensor(x) for x in rows))
    monkeypatch.setattr(buffer, "InFlight", Flight)
    last_of_each_flush = []
    take = RowBuffer.take

    def recording_take(self):
        made = Flight.made
        job = take(self)
        if Flight.made > made:
            last_of_each_flush.append(Flight.made)
        return job

    monkeypatch.setattr(RowBuffer, "take", recording_take)
    rows = _rows(14)
    for name, process in (("plain.h5", False), ("bg.h5", True)):
        w = _writer(tmp_path / name, process)
        w.write_initial(torch.tensor(0.5, dtype=torch.float64))
        _append(w, rows, 0, 14, tensors=True)
        w.close()
    _same_files(tmp_path / "plain.h5", tmp_path / "bg.h5")
    # one wait per flush that had rows in flight, for its last copy (flushes of several rows each)
    assert len(last_of_each_flush) >= 3 and Flight.made > len(last_of_each_flush)
    assert waits == last_of_each_flush


def test_no_room_for_the_arena_warns_with_the_fix_and_the_writer_thread_writes(
    tmp_path: Path, monkeypatch
) -> None:
    """A full /dev/shm is a clear error when the arena is reserved (not a SIGBUS later); the run goes on
    with the writer thread doing the HDF5 calls, and the file is the same."""
    from lca_lab import file_process

    with pytest.raises(OSError, match="cannot reserve .* shared memory .* lower store.flush_every"):
        file_process.FileProcess(10**15)  # more than any /dev/shm or temp folder holds
    real = file_process.FileProcess
    monkeypatch.setattr(transport, "FileProcess", lambda nbytes: real(nbytes + 10**15))
    rows = _rows(14)
    with pytest.warns(UserWarning, match="cannot reserve .* written by the writer thread instead"):
        w = _writer(tmp_path / "proc.h5", True)
    assert w.transport.sink.process is None and isinstance(w.transport, WriterThread)
    w.write_initial(0.5)
    _append(w, rows, 0, 14)
    w.close()
    _same_as_plain_writer(tmp_path / "proc.h5", rows)
