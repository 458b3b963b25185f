"""``python -m lca_lab.bench --loops``: LCA's cost in lca_lab's loop and in other loops, side by side."""

from __future__ import annotations

import json
import subprocess
import sys


def test_bench_loops_reports_each_loop_with_and_without_lca(tmp_path):
    out = tmp_path / "loops.json"
    cmd = [sys.executable, "-m", "lca_lab.bench", "--loops", "--which", "own,track", "--n-train", "512",
           "--batch", "64", "--epochs", "2", "--repeats", "1", "--json", str(out)]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    r = json.loads(out.read_text())
    assert {"device", "torch", "commit", "date", "options"} <= set(r)
    rows = {row["loop"]: row for row in r["loops"]}
    assert set(rows) == {"own", "track"}
    for row in rows.values():
        # LCA's passes cost more than the step itself, and both loops did the same LCA work (2 points)
        assert row["with_lca_s"] > row["without_lca_s"] > 0 and row["mean_splits"] == 2.0
        assert row["lca_s"] == row["with_lca_s"] - row["without_lca_s"]
    assert rows["own"]["overhead_vs_own"] == 1.0 and rows["track"]["overhead_vs_own"] > 0


def test_bench_loops_refuses_bad_options():
    p = subprocess.run([sys.executable, "-m", "lca_lab.bench", "--loops", "--which", "own,keras"],
                       capture_output=True, text=True)  # fmt: skip
    err = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(err) == 1 and "(got keras)" in err[0]
