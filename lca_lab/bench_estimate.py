"""``python -m lca_lab.bench --estimate``: subset estimates against the exact LCA on the same trajectory.

For each net: train one trajectory (SGD with momentum on the bundled real MNIST digits, ``mnist5k``,
4,500 training examples; θ_t kept in memory), compute the exact LCA of every step (the engine of
``python -m lca_lab``: RK4/Simpson, adaptive, ``--tolerance``), then the subset estimate
(:class:`lca_lab.subset_engine.SubsetEngine`) of the same steps for every subset
size, and report per size:

* cost: gradient points per iteration and example-gradients per iteration (points × examples, counted by
  the engines; the exact path's points are the new ones it evaluates, g(θ_{t+1}) being reused as the next
  g(θ_t)), forward-mode products per iteration (examples × layer tangents, counted), wall time per
  iteration, and the ratios exact / subset;
* coverage of the 95 % intervals: the share of iterations whose exact total (and each layer's exact LCA)
  lies within the estimate ± t_{0.975, df} SE (``coverage_*``; df: :func:`lca_lab.estimate.draw_df`), and
  within ± 1.96 SE (``coverage_*_z``) for comparison;
* run totals: per layer and summed, the estimate's error against the exact total, its SE
  (sqrt(Σ_t SE_t² + 2 Σ_t cov_t) for fresh draws, cov_t the covariance of adjacent rows of overlapping
  halves; a fixed subset's from its per-unit run sums) and whether the error is
  within its 95 % interval;
* % helping (the paper's Table 1 measure, zeros ignored, mean over iterations) from the exact and the
  estimated per-parameter LCA: the bias in percentage points;
* the quadrature's residual on the subset (|Σ Â − ΔL̂|, the stored ``lca/error``) next to the exact one's.

Nets: ``fc`` (MNIST-FC 784-100-50-10, examples stratified by class) and ``convbn`` (a BatchNorm conv net:
conv 5×5/2 (8) - BN - ReLU - conv 3×3/2 (16) - BN - ReLU - linear; L in chunks of ``--bn-chunk``
examples, whole chunks sampled). Timing on a shared CPU is noisy; the counts are exact.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .estimate import interval_q, subset_plan_for
from .lca import FullBatchLoss, LayerSums, LCAEngine, StepLCA
from .nets import entry_layer_index, fc, layer_groups
from .subset_engine import SubsetEngine

NETS = ("fc", "convbn")


def convbn(n_classes: int = 10) -> nn.Module:
    """The benchmark's small BatchNorm conv net for [B, 1, 28, 28] inputs (5,434 parameters, 3 layers)."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 5, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 5 * 5, n_classes),
    )  # fmt: skip


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def train_trajectory(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, iters: int, lr: float, batch: int, seed: int
) -> list[torch.Tensor]:
    """θ_0 … θ_iters (flat float32 copies) of SGD (momentum 0.9) on random batches of ``batch``."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    flat = lambda: torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()  # noqa: E731
    out = [flat()]
    model.train()
    for _ in range(iters):
        idx = torch.randint(0, len(y), (batch,), generator=g)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        out.append(flat())
    return out


def _pct_helping(st: StepLCA) -> float:
    """% of non-zero per-parameter LCA entries that help (negative), this step."""
    h, u = int((st.param < 0).sum()), int((st.param > 0).sum())
    return 100.0 * h / max(h + u, 1)


def _run(engine: Any, traj: list[torch.Tensor]) -> tuple[dict[str, np.ndarray], int]:
    """Every step of ``traj`` → its rows, and the example-gradients of the priming pass (subset engines)."""
    rows: dict[str, list] = {
        k: [] for k in ("total", "layer", "error", "passes", "pct", "se", "layer_se", "s")
    }
    engine.prime(traj[0])  # the exact path (and a fixed subset) reuse this endpoint
    primed = getattr(engine, "examples_evaluated", 0)
    for a, b in zip(traj[:-1], traj[1:]):
        t0 = time.perf_counter()
        st = engine.step(a, b)
        rows["s"].append(time.perf_counter() - t0)
        rows["total"].append(float(st.total))
        rows["layer"].append(st.layer.cpu().numpy())
        rows["error"].append(float(st.error))
        rows["passes"].append(st.passes)
        rows["pct"].append(_pct_helping(st))
        if st.total_se is not None:
            rows["se"].append(float(st.total_se))
            rows["layer_se"].append(st.layer_se.cpu().numpy())
    return {k: np.asarray(v) for k, v in rows.items() if len(v)}, primed


def _coverage(est: dict, ex: dict, q: float) -> tuple[float, np.ndarray]:
    """Share of rows whose exact total (and each layer's exact LCA) lies within the estimate ± q · SE."""
    tot = float(np.mean(np.abs(est["total"] - ex["total"]) <= q * est["se"]))
    return tot, np.mean(np.abs(est["layer"] - ex["layer"]) <= q * est["layer_se"], axis=0)


def bench_net(
    name: str,
    subsets: Sequence[float],
    iters: int,
    tol: float,
    seed: int,
    bn_chunk: int,
    draws: Sequence[str],
) -> dict:
    from .data import mnist5k

    torch.manual_seed(seed)
    data = mnist5k()
    x, y = data.train.inputs, data.train.targets
    if name == "fc":
        model, chunk, lr = fc((1, 28, 28), 10), len(y), 0.05
    elif name == "convbn":
        model, chunk, lr = convbn(10), bn_chunk, 0.05
    else:
        raise ValueError(f"--nets: unknown net {name!r}; choose from {list(NETS)}")
    names = [g[0] for g in layer_groups(model)]
    idx = entry_layer_index(model)
    ls = LayerSums(idx, len(names))
    _log(f"[{name}] training {iters} iterations")
    traj = train_trajectory(model, x, y, iters, lr, 100, seed)
    fbl = FullBatchLoss(model, x, y, chunk)
    _log(f"[{name}] exact LCA of {iters} steps")
    ex, _ = _run(LCAEngine(fbl, "rk4", tol, 32, layer_sums=ls), traj)
    N = len(y)
    exact_cost = {
        "points_per_iter": float(ex["passes"].mean()),
        "example_grads_per_iter": float(ex["passes"].mean() * N),
        "s_per_iter": float(np.median(ex["s"])),
    }
    out: dict[str, Any] = {
        "net": name, "n_train": N, "chunk_size": chunk, "layers": names, "iterations": iters,
        "n_params": int(idx.numel()), "tolerance": tol,
        "loss_start_end": [float(fbl.loss(traj[0])), float(fbl.loss(traj[-1]))],
        "exact": {**exact_cost, "pct_helping": float(ex["pct"].mean()),
                  "mean_abs_quadrature_error": float(np.abs(ex["error"]).mean()),
                  "run_total": float(ex["total"].sum()), "run_layer": ex["layer"].sum(0).tolist()},
        "subsets": [],
    }  # fmt: skip
    for s, draw in ((s, d) for s in subsets for d in draws):
        plan = subset_plan_for(fbl, s)
        eng = SubsetEngine(fbl, plan, ls, "rk4", tol, 32, base_seed=seed, fixed=draw == "fixed")
        _log(f"[{name}] subset {s} ({draw}): {plan.n_drawn} {plan.unit}s per draw")
        est, primed = _run(eng, traj)
        eng.examples_evaluated -= primed  # the priming pass is not a step's
        grads = eng.examples_evaluated / iters  # example-gradients per iteration, counted
        n_ex = float(np.mean([len(eng._draw(t).examples) for t in range(min(iters, 4))]))
        pts = float(est["passes"].mean())  # gradient points over the whole subset (a reused start: 0)
        jvps = eng.example_jvps / iters  # forward-mode products (examples × layer tangents), counted
        q, q_run = interval_q(eng.df), eng.run_q(iters)

        (cov_total, cov_layer), (cov_total_z, cov_layer_z) = _coverage(est, ex, q), _coverage(est, ex, 1.96)
        run_se, run_se_layer = eng.run_se()  # fresh: sqrt(Σ SE² + 2 Σ cov); fixed: per-unit run sums
        run_err_layer = est["layer"].sum(0) - ex["layer"].sum(0)
        run_err = float(est["total"].sum() - ex["total"].sum())
        sub = {
            "subset": s, "draw": draw, "unit": plan.unit, "units_per_draw": plan.n_drawn,
            "examples_per_draw": n_ex,
            "points_per_iter": pts, "example_grads_per_iter": grads, "example_jvps_per_iter": jvps,
            "overlapping_halves": eng.halves,
            "s_per_iter": float(np.median(est["s"])),
            "grad_ratio": exact_cost["example_grads_per_iter"] / grads,
            "time_ratio": exact_cost["s_per_iter"] / float(np.median(est["s"])),
            "df": eng.df, "interval_q": q, "run_interval_q": q_run,
            "coverage_total": cov_total, "coverage_layer": cov_layer.tolist(),
            "coverage_total_z": cov_total_z, "coverage_layer_z": cov_layer_z.tolist(),
            "median_rel_se": float(np.median(est["se"] / np.maximum(np.abs(ex["total"]), 1e-12))),
            "run_total": float(est["total"].sum()), "run_total_err": run_err, "run_total_se": run_se,
            "run_total_within_95": abs(run_err) <= q_run * run_se,
            "run_layer": est["layer"].sum(0).tolist(), "run_layer_err": run_err_layer.tolist(),
            "run_layer_se": run_se_layer.tolist(),
            "run_layer_within_95": (np.abs(run_err_layer) <= q_run * run_se_layer).tolist(),
            "pct_helping": float(est["pct"].mean()),
            "pct_helping_bias": float(est["pct"].mean() - ex["pct"].mean()),
            "mean_abs_quadrature_error": float(np.abs(est["error"]).mean()),
        }  # fmt: skip
        out["subsets"].append(sub)
        _log(
            f"[{name}] subset {s}: coverage total {cov_total:.3f}, layers {np.round(cov_layer, 3).tolist()}, "
            f"grads ×{sub['grad_ratio']:.1f} fewer, % helping bias {sub['pct_helping_bias']:+.2f} pp"
        )
    return out


def provenance() -> dict[str, Any]:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=os.path.dirname(__file__)).stdout.strip()  # fmt: skip
    except OSError:
        sha = ""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": sha, "cpu": cpu,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
    }  # fmt: skip


def format_table(res: dict) -> str:
    pv = res["provenance"]
    lines = [
        f"subset estimates vs exact LCA — {pv['cpu']}, {pv['threads']} threads, commit {pv['commit']}, "
        f"{pv['date']}",
        "",
        "| net | subset | draw | units/draw | points/it (exact → subset) | example-grads/it ratio | "
        "jvps/it | time ratio | interval | coverage total | coverage per layer | "
        "run-total err / SE (per layer) | % helping exact → est (bias pp) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["nets"]:
        e = r["exact"]
        for s in r["subsets"]:
            z = [f"{a / b:+.2f}" if b > 0 else "n/a" for a, b in zip(s["run_layer_err"], s["run_layer_se"])]
            lines.append(
                f"| {r['net']} | {s['subset']} | {s['draw']} | {s['units_per_draw']} {s['unit']}s | "
                f"{e['points_per_iter']:.2f} → {s['points_per_iter']:.2f} | {s['grad_ratio']:.1f}× | "
                f"{s['example_jvps_per_iter']:.0f} | {s['time_ratio']:.2f}× | "
                f"± {s['interval_q']:.2f} SE (df {s['df']}) | {s['coverage_total']:.3f} | "
                f"{', '.join(f'{c:.3f}' for c in s['coverage_layer'])} | {', '.join(z)} | "
                f"{e['pct_helping']:.2f} → {s['pct_helping']:.2f} ({s['pct_helping_bias']:+.2f}) |"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lca_lab.bench --estimate", description=__doc__.split("\n")[0])
    p.add_argument("--estimate", action="store_true", help="(selects this benchmark)")
    p.add_argument("--nets", default="fc,convbn", help="comma list of fc,convbn (default both)")
    p.add_argument(
        "--subsets", default="0.1,0.25", help="comma list of fractions or counts (default 0.1,0.25)"
    )
    p.add_argument("--iters", type=int, default=200, help="trained iterations = LCA rows (default 200)")
    p.add_argument("--tolerance", type=float, default=1e-3, help="engine tolerance, nats (default 1e-3)")
    p.add_argument("--bn-chunk", type=int, default=50, help="chunk_size of the BN net (default 50)")
    p.add_argument("--draws", default="fresh,fixed", help="comma list of fresh,fixed (default both)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", "--out", dest="json_path", help="also write the results as JSON to this path")
    o = p.parse_args(argv)
    nets = [n.strip() for n in o.nets.split(",") if n.strip()]
    bad = [n for n in nets if n not in NETS]
    if bad or o.iters < 2:
        print(f"error: --nets takes {list(NETS)} and --iters ≥ 2 (got {o.nets}, {o.iters})", file=sys.stderr)
        return 2
    try:
        subsets = [float(v) if "." in v else int(v) for v in o.subsets.split(",")]
    except ValueError:
        print(f"error: --subsets takes fractions or counts, e.g. 0.1,0.25 (got {o.subsets})", file=sys.stderr)
        return 2
    draws = [d.strip() for d in o.draws.split(",") if d.strip()]
    if not draws or any(d not in ("fresh", "fixed") for d in draws):
        print(f"error: --draws takes fresh,fixed (got {o.draws})", file=sys.stderr)
        return 2
    if o.threads:
        torch.set_num_threads(o.threads)
    res = {"provenance": provenance(), "argv": list(sys.argv[1:] if argv is None else argv), "nets": []}
    for n in nets:
        res["nets"].append(bench_net(n, subsets, o.iters, o.tolerance, o.seed, o.bn_chunk, draws))
    print(format_table(res))
    if o.json_path:
        with open(o.json_path, "w") as f:
            json.dump(res, f, indent=1)
        _log(f"wrote {o.json_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
