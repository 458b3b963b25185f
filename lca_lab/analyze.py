"""``python -m lca_lab.analyze PATH``: statistics, report and figures for a run or a sweep.

PATH is a run directory (holding ``lca.h5``), a run file, or a multirun directory (searched recursively).
Runs are grouped by their resolved config minus the seed; each group gets the paper's Table-1 quantity,
per-layer one-sample t-tests across seeds, moments of learning with the shift baseline, heavy-tail fits
and oscillation periods; groups are compared with Welch t-tests (final losses, per-layer LCA) against a
reference group, and a layer's total LCA is regressed on a swept numeric setting when one varies.
Writes ``report.md``, ``report.json`` and PNG figures into PATH (or ``--out``) and prints the tables.
Incomplete and failed runs are listed and skipped.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from . import figures as fg
from . import stats
from .estimate import interval_q, run_df
from .jsonable import jsonable
from .store import MalformedRunFileError, open_run
from .sweep import FAILED_MARKER, job_order

IGNORED_KEYS = ("seed", "device", "data.root", "store.", "eval_every", "hydra", "logger.")


def find_run_files(path: Path) -> list[Path]:
    """All ``lca.h5`` under ``path`` (or ``path`` itself when it is a file), in job order."""
    path = Path(path)
    if path.is_file():
        return [path]
    if (path / "lca.h5").exists():
        return [path / "lca.h5"]
    return sorted(path.rglob("lca.h5"), key=job_order)


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = d
    return out


def _group_key(cfg: dict[str, Any]) -> tuple:
    flat = _flatten(cfg)
    keep = {k: v for k, v in flat.items() if not any(k == p or k.startswith(p) for p in IGNORED_KEYS)}
    return tuple(sorted((k, json.dumps(v, sort_keys=True)) for k, v in keep.items()))


def run_layer_se(h5: Any, T: int) -> np.ndarray:
    """Standard errors [n_layers] of the per-layer run totals of a subset estimate: the run's own
    ``estimate/run_layer_se`` when written (a fixed subset's come from per-unit run sums: its rows'
    errors are correlated), else sqrt(Σ_t SE_t² + 2 Σ_t cov_t) over the rows (fresh draws are independent;
    overlapping halves store the covariance of adjacent rows, ``estimate/cov_prev``)."""
    if "estimate/run_layer_se" in h5:
        return np.asarray(h5["estimate/run_layer_se"][:], dtype=np.float64)
    var = (np.asarray(h5["lca/layer_se"][:T], dtype=np.float64) ** 2).sum(0)
    if "estimate/cov_prev" in h5:
        var = var + 2.0 * np.asarray(h5["estimate/cov_prev"][:T, :-1], dtype=np.float64).sum(0)
    return np.sqrt(np.maximum(var, 0.0))


def load_run(path: Path, max_entries: int = 2_000_000) -> dict[str, Any]:
    """The numbers one run contributes to the analysis (small arrays; per-parameter rows sampled)."""
    with open_run(path) as r:
        h5 = r.h5
        cfg = yaml.safe_load(r.config) if r.config else {}
        rec: dict[str, Any] = {"path": str(path), "status": r.status, "config": cfg}
        ov = r.attrs.get("overrides")
        rec["overrides"] = [o for o in json.loads(ov) if not o.startswith("seed=")] if ov else None
        if not r.is_complete:
            return rec
        T = r.n_rows
        rec["layer_names"] = list(r.layer_names)
        rec["n_rows"] = T
        rec["train_loss_path"] = np.asarray(r.train_loss)
        rec["lca_layer"] = np.asarray(r.lca_layer)  # [T, n_layers]
        rec["layer_totals"] = rec["lca_layer"].sum(0)
        if "lca/layer_se" in h5:  # subset estimates (lca_lab.estimate): standard errors of the run totals
            rec["layer_totals_se"] = run_layer_se(h5, T)
            df = run_df(int(r.attrs.get("lca_subset_df", 0)), T, bool(r.attrs.get("lca_subset_fixed", False)))
            rec["layer_totals_q"] = interval_q(df)  # 95 % interval: ± q · SE
        rec["error"] = np.asarray(r.lca_error)
        ev = {
            n: np.asarray(h5[f"eval/{n}"][:])
            for n in ("iteration", "test_loss", "test_acc", "train_loss", "train_acc")
            if f"eval/{n}" in h5
        }
        rec["eval"] = ev

        def last_finite(a):
            a = a[np.isfinite(a)] if a is not None else np.array([])
            return float(a[-1]) if a.size else math.nan

        rec["final_train_loss"] = last_finite(ev.get("train_loss"))
        rec["final_test_loss"] = last_finite(ev.get("test_loss"))
        rec["final_test_acc"] = last_finite(ev.get("test_acc"))
        if "reduce/frac_helping" in h5:
            fh, fu = h5["reduce/frac_helping"][:], h5["reduce/frac_hurting"][:]
            fz = h5["reduce/frac_zero"][:]
            rec["frac"] = (fh, fu, fz)
            with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # a frozen layer: all-zero, no share
                rec["pct_helping"] = float(np.nanmean(100 * fh / (fh + fu)))
                lh, lu = h5["reduce/layer_frac_helping"][:], h5["reduce/layer_frac_hurting"][:]
                rec["pct_helping_layer"] = np.nanmean(100 * lh / (lh + lu), axis=0)
            helped, hurt = h5["reduce/param_helped"][:], h5["reduce/param_hurt"][:]
            with np.errstate(invalid="ignore", divide="ignore"):
                rec["frac_helped_param"] = helped / (helped + hurt)
            rec["motion_period"] = stats.oscillation_period(h5["reduce/motion_changes"][:], T)
            rec["grad_period"] = stats.oscillation_period(h5["reduce/grad_sign_changes"][:], T)
        if "lca/class_layer" in h5:
            rec["class_layer"] = h5["lca/class_layer"][:]  # [T, C, n_layers]
        if r.per_param:
            K = int(h5["lca/param"].shape[1])
            step = max(1, int(math.ceil(T * K / max_entries)))
            rec["param_sample"] = h5["lca/param"][::step]
            rec["param_sample_step"] = step
            rec["param_names"], rec["param_shapes"] = list(r.param_names), list(r.param_shapes)
            rec["param_layer"] = np.asarray(r.param_layer)
        rec["has_trajectory"] = r.has_trajectory
        if r.per_param and r.has_trajectory:
            ds = h5["lca/param"]
            if T * ds.shape[1] <= 5e8:  # exact totals, read in row blocks
                tot = np.zeros(ds.shape[1])
                for a in range(0, T, 256):
                    tot += ds[a : a + 256].sum(0, dtype=np.float64)
            else:  # very large runs: pick on the sampled rows
                tot = rec["param_sample"].sum(0, dtype=np.float64)
            order = np.argsort(tot)
            pick = sorted(set(order[:3].tolist()) | set(order[-3:].tolist()), key=lambda j: tot[j])
            labels = []
            offsets = np.cumsum([0] + [int(np.prod(sh)) for sh in rec["param_shapes"]])
            for j in pick:
                ti = int(np.searchsorted(offsets, j, side="right") - 1)
                idx = np.unravel_index(j - offsets[ti], rec["param_shapes"][ti])
                kind = "helped most" if tot[j] < 0 else "hurt most"
                labels.append(f"{rec['param_names'][ti]}{list(map(int, idx))} ({kind})")
            cols = sorted(pick)
            theta = h5["trajectory/theta"][:, cols].T.astype(np.float64)  # [n, T+1]
            lca_full = h5["lca/param"][:, cols].T.astype(np.float64)  # [n, T], every row of these few
            pos = [cols.index(j) for j in pick]
            rec["theta_top"] = (labels, theta[pos], lca_full[pos])
        return rec


def _labels(keys: list[tuple], groups: dict[tuple, list[dict]], varying: list[str]) -> list[str]:
    """A short readable label per group: its command-line overrides that not every group shares (from
    the CLI's ``overrides`` attribute), else the config values that differ between groups."""
    ovs = [groups[k][0].get("overrides") for k in keys]
    if all(o is not None for o in ovs):
        common = set.intersection(*(set(o) for o in ovs)) if len(ovs) > 1 else set()
        return [", ".join(o for o in ov if o not in common) or "(defaults)" for ov in ovs]
    out = []
    for k in keys:
        d = dict(k)
        out.append(", ".join(f"{v}={json.loads(d[v])}" for v in varying if v in d) or "(defaults)")
    return out


def _fmt(x: Any, digits: int = 4) -> str:
    if isinstance(x, float):
        if math.isnan(x):
            return "nan"
        if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e4):
            return f"{x:.2e}"
        return f"{x:.{digits}g}"
    return str(x)


def _table(rows: list[dict], cols: list[str]) -> str:
    head = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
    return head + "".join("| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |\n" for r in rows)


def analyze(
    path: Path,
    out: Path | None = None,
    k: int = 20,
    repeats: int = 1000,
    alpha: float = 0.05,
    make_figures: bool = True,
    animation_frames: int = 30,
) -> dict[str, Any]:
    """Run the whole analysis; returns the report dict (also written to ``report.json``)."""
    path = Path(path)
    out = Path(out) if out else (path if path.is_dir() else path.parent)
    out.mkdir(parents=True, exist_ok=True)
    files = find_run_files(path)
    early: list[dict[str, str]] = []  # multirun jobs that failed before writing a run file (a config error)
    if path.is_dir():
        for m in sorted(path.rglob(FAILED_MARKER), key=job_order):
            if not (m.parent / "lca.h5").exists():
                why = (m.read_text().strip().splitlines() or ["failed"])[0]
                early.append({"path": str(m.parent), "status": f"failed before the run file: {why}"})
    if not files:
        listed = "".join(f"\n  {e['path']}: {e['status']}" for e in early)
        failed = f"; {len(early)} job(s) failed before writing one:{listed}" if early else ""
        raise FileNotFoundError(f"no lca.h5 run files under {path}{failed}")
    runs, skipped = [], []
    for f in files:
        try:
            rec = load_run(f)
        except (OSError, MalformedRunFileError) as e:  # unreadable (killed mid-flush) or malformed
            skipped.append({"path": str(f), "status": f"unreadable: {e}"})
            continue
        (runs if rec["status"] == "complete" else skipped).append(
            rec if rec["status"] == "complete" else {"path": str(f), "status": rec["status"]}
        )
    skipped += early
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault(_group_key(r["config"]), []).append(r)
    keys = list(groups)
    all_flat = [dict(k) for k in keys]
    varying = sorted({k for d in all_flat for k in d if len({json.dumps(x.get(k)) for x in all_flat}) > 1})
    report: dict[str, Any] = {
        "path": str(path),
        "n_runs": len(runs),
        "skipped": skipped,
        "groups": [],
        "comparisons": [],
        "regressions": [],
        "figures": [],
    }
    figs: list[tuple[str, Any]] = []
    labels = _labels(keys, groups, varying)
    for gi, key in enumerate(keys):
        rs = groups[key]
        label = labels[gi]
        names = rs[0]["layer_names"]
        totals = np.stack([r["layer_totals"] for r in rs])
        g: dict[str, Any] = {
            "label": label,
            "n": len(rs),
            "runs": [r["path"] for r in rs],
            "layer_names": names,
        }
        g["final_train_loss"] = stats.mean_std([r["final_train_loss"] for r in rs])
        g["final_test_loss"] = stats.mean_std([r["final_test_loss"] for r in rs])
        g["final_test_acc"] = stats.mean_std([r["final_test_acc"] for r in rs])
        if all("pct_helping" in r for r in rs):
            g["pct_helping"] = stats.mean_std([r["pct_helping"] for r in rs])
            g["motion_period"] = stats.mean_std([r["motion_period"] for r in rs])
            g["grad_period"] = stats.mean_std([r["grad_period"] for r in rs])
        g["max_abs_error"] = float(max(np.abs(r["error"]).max() for r in rs))
        g["cumulative_rel_error"] = stats.mean_std(
            [abs(r["error"].sum()) / abs(r["train_loss_path"][-1] - r["train_loss_path"][0]) for r in rs]
        )
        g["layer_effects"] = stats.layer_effects(totals, names, alpha=alpha)
        if all("layer_totals_se" in r for r in rs):
            se = np.stack([r["layer_totals_se"] for r in rs])
            q = np.array([r.get("layer_totals_q", 1.96) for r in rs])
            g["estimate"] = estimate_intervals(totals, se, names, q)
        # Moments of learning: per-class curves when stored (stronger test), else per-layer totals.
        r0 = rs[0]
        curves = np.transpose(r0["class_layer"], (1, 2, 0)) if "class_layer" in r0 else r0["lca_layer"].T
        if curves.shape[-1] >= 5:
            g["moments"] = {
                "per_class": "class_layer" in r0,
                "run": r0["path"],
                **stats.shift_baseline(curves, k=k, repeats=repeats, keep_counts=False),
            }
        if "param_sample" in r0:
            g["heavy_tails"] = stats.heavy_tails(r0["param_sample"])
        report["groups"].append(g)
        if make_figures:
            tag = f"g{gi}"
            fh, fu, fz = r0.get("frac", (None, None, None))
            if fh is not None:
                figs.append(
                    (
                        f"{tag}_helping_over_training.png",
                        fg.helping_over_training(
                            fh,
                            fu,
                            fz,
                            loss=r0["train_loss_path"],
                            title=f"% helping / hurting / zero — {label}",
                        ),
                    )
                )
                figs.append(
                    (f"{tag}_helping_per_layer.png", fg.helping_per_layer(r0["pct_helping_layer"], names))
                )
                figs.append(
                    (f"{tag}_fraction_helped.png", fg.fraction_helped_histogram(r0["frac_helped_param"]))
                )
            if "param_sample" in r0:
                figs.append(
                    (f"{tag}_lca_distribution.png", fg.lca_distribution(r0["param_sample"], log_y=True))
                )
                figs += _param_figures(r0, tag)
            if "moments" in g:
                figs.append(
                    (f"{tag}_moments_of_learning.png", _moments_figure(curves, k, names, r0["n_rows"]))
                )
    # Between-group comparisons against a reference group (layers=none if present, else the first).
    if len(keys) > 1:
        ref = next((i for i, kk in enumerate(keys) if not any(k.startswith("layers.") for k, _ in kk)), 0)
        A = groups[keys[ref]]
        for i, kk in enumerate(keys):
            if i == ref:
                continue
            B = groups[kk]
            comp = {"a": report["groups"][ref]["label"], "b": report["groups"][i]["label"]}
            for metric in ("final_train_loss", "final_test_loss"):
                comp[metric] = stats.welch([r[metric] for r in A], [r[metric] for r in B], alpha=alpha)
            if len(A[0]["layer_names"]) == len(B[0]["layer_names"]):
                comp["layers"] = stats.layer_welch(
                    np.stack([r["layer_totals"] for r in A]),
                    np.stack([r["layer_totals"] for r in B]),
                    A[0]["layer_names"],
                    alpha=alpha,
                )
            report["comparisons"].append(comp)
        if make_figures:
            names = groups[keys[0]][0]["layer_names"]
            if all(groups[kk][0]["layer_names"] == names for kk in keys):
                figs.append(
                    (
                        "layer_totals.png",
                        fg.layer_totals(
                            [np.stack([r["layer_totals"] for r in groups[kk]]) for kk in keys],
                            names,
                            labels=[g["label"] for g in report["groups"]],
                        ),
                    )
                )
    elif make_figures and runs:
        rs = groups[keys[0]]
        figs.append(
            (
                "layer_totals.png",
                fg.layer_totals(
                    [np.stack([r["layer_totals"] for r in rs])],
                    rs[0]["layer_names"],
                    labels=[report["groups"][0]["label"]],
                ),
            )
        )
    # Regression on a single swept numeric setting (e.g. layers.last.momentum_delay).
    if len(varying) == 1 and len(keys) >= 3:
        vals = [json.loads(dict(kk).get(varying[0], "null")) for kk in keys]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
            names = groups[keys[0]][0]["layer_names"]
            xs = np.concatenate([[v] * len(groups[kk]) for v, kk in zip(vals, keys)]).astype(float)
            tots = np.concatenate([np.stack([r["layer_totals"] for r in groups[kk]]) for kk in keys])
            for li, name in enumerate(names):
                report["regressions"].append(
                    {"setting": varying[0], "layer": name, **stats.regression(xs, tots[:, li])}
                )
            if make_figures:
                order = np.argsort(vals)
                last = report["regressions"][-1]
                figs.append(
                    (
                        "layer_vs_value.png",
                        fg.layer_vs_value(
                            np.asarray(vals, float)[order],
                            [np.stack([r["layer_totals"] for r in groups[keys[i]]]) for i in order],
                            names,
                            value_name=varying[0],
                            fit=(last["slope"], last["intercept"]),
                        ),
                    )
                )
    for name, fig in figs:
        fg.save(fig, out / name)
        report["figures"].append(name)
    if make_figures and animation_frames > 0:
        for gi, key in enumerate(keys):
            r0 = groups[key][0]
            if "param_sample" in r0:
                gif = _animation(r0, out, f"g{gi}", animation_frames)
                if gif:
                    report["figures"].append(gif)
    (out / "report.json").write_text(json.dumps(jsonable(report), indent=2))
    md = render_markdown(report)
    (out / "report.md").write_text(md)
    return report


def _heatmap_param(shapes: list) -> int | None:
    """Index of the parameter tensor drawn in the heatmap and the animation.

    The first tensor with at least two dimensions (a linear ``[out, in]``, an embedding
    ``[vocab, width]`` or a conv ``[out, in, kh, kw]`` weight): for the paper's nets that is the first
    layer's weight, as before; for a model whose first tensor is a vector (a LayerNorm, a bias) the
    first weight matrix. With no such tensor, the first non-empty one (drawn as a strip); None when
    every tensor is empty.
    """
    sizes = [int(np.prod(s)) for s in shapes]
    for i, s in enumerate(shapes):
        if len(s) >= 2 and sizes[i] > 0:
            return i
    return next((i for i, n in enumerate(sizes) if n > 0), None)


def _param_figures(r: dict, tag: str) -> list[tuple[str, Any]]:
    """Heatmap of the first weight matrix (:func:`_heatmap_param`) at the iteration of largest total
    |LCA|, from sampled rows."""
    out = []
    names, shapes, sample = r["param_names"], r["param_shapes"], r["param_sample"]
    i = _heatmap_param(shapes)
    if sample.shape[0] == 0 or i is None:
        return out
    offsets = np.cumsum([0] + [int(np.prod(s)) for s in shapes])
    t = int(np.argmax(np.abs(sample).sum(1)))
    block = sample[t, offsets[i] : offsets[i + 1]].reshape(shapes[i])
    it = t * r["param_sample_step"]
    out.append(
        (f"{tag}_heatmap_{names[i]}.png", fg.param_heatmap(block, title=f"{names[i]}, iteration {it}"))
    )
    # Top trajectories: the parameters with the most negative / positive total LCA (needs θ stored).
    if r.get("theta_top") is not None:
        lab, th, lca = r["theta_top"]
        with np.errstate(invalid="ignore", divide="ignore"):
            # ḡ = A / Δθ: the path-averaged full-batch gradient of each step (NaN where θ did not move)
            gbar = lca / np.diff(th, axis=1)
        title = (
            "Trajectories of the parameters that helped and hurt most\n"
            "(gradient panel: the step's path-averaged full-batch gradient ḡ = LCA / Δθ)"
        )
        out.append((f"{tag}_top_trajectories.png", fg.top_trajectories(th, gbar, lca, lab, title=title)))
    return out


def _animation(r: dict, out: Path, tag: str, max_frames: int) -> str | None:
    """GIF of the heatmap's weight LCA (:func:`_heatmap_param`) over the sampled iterations (paper
    Figure 2's videos)."""
    sample, shapes, names = r["param_sample"], r["param_shapes"], r["param_names"]
    i = _heatmap_param(shapes)
    if sample.shape[0] < 2 or max_frames <= 0 or i is None:
        return None
    a = int(sum(int(np.prod(s)) for s in shapes[:i]))
    shape = tuple(shapes[i]) or (1,)  # a scalar parameter: one pixel per frame
    frames = sample[:, a : a + int(np.prod(shape))].reshape(sample.shape[0], *shape)
    name = f"{tag}_animation_{names[i]}.gif"
    fg.param_animation(
        frames,
        out / name,
        iterations=np.arange(sample.shape[0]) * r["param_sample_step"],
        max_frames=max_frames,
        title=names[i],
    )
    return name


def _moments_figure(curves: np.ndarray, k: int, names: list[str], T: int):
    if curves.ndim == 2:
        moms = [stats.moments_of_learning(c, k).tolist() for c in curves]
        sync = stats.synchronized_moments(curves, k)["iterations"]
        return fg.moments_of_learning(moms, T, names, synchronized=sync)
    moms = [[stats.moments_of_learning(c, k).tolist() for c in cls] for cls in curves]
    sync = stats.synchronized_moments(curves, k)["iterations"]
    return fg.moments_of_learning(moms, T, names, synchronized=sync)


def estimate_intervals(
    totals: np.ndarray, se: np.ndarray, names: list[str], q: np.ndarray | None = None
) -> list[dict[str, Any]]:
    """Per layer, for runs of subset estimates: each run's total ± q · SE (the sampling's 95 % interval;
    ``q`` [n_runs]: Student's t quantile of each run's degrees of freedom, default 1.96), and the share
    of the between-seed variance of the totals that the sampling adds (mean SE² over the runs / variance
    of the totals across runs; NaN with one run). The t-tests across seeds use the
    totals as they are: the sampling's variance is part of the spread they see."""
    q = np.full(len(totals), 1.96) if q is None else np.asarray(q, dtype=np.float64)
    rows = []
    for j, name in enumerate(names):
        var = float(np.var(totals[:, j], ddof=1)) if len(totals) > 1 else math.nan
        rows.append(
            {
                "layer": name,
                "run totals (95 % interval)": "; ".join(
                    f"{t:+.4g} ± {k * s:.2g}" for t, s, k in zip(totals[:, j], se[:, j], q)
                ),
                "mean SE": float(se[:, j].mean()),
                "sampling share of between-seed var": float(np.mean(se[:, j] ** 2)) / var
                if var and var > 0
                else math.nan,
            }
        )
    return rows


def _pm(d: dict) -> str:
    return f"{_fmt(d.get('mean', math.nan))} ± {_fmt(d.get('std', math.nan))}"


def render_markdown(rep: dict[str, Any]) -> str:
    """The report as Markdown tables."""
    lines = [
        f"# LCA analysis of `{rep['path']}`",
        "",
        f"{rep['n_runs']} complete run(s) in {len(rep['groups'])} group(s) (config minus seed).",
    ]
    if rep["skipped"]:
        lines += [
            "",
            "## Skipped runs (incomplete or failed)",
            "",
            _table(rep["skipped"], ["path", "status"]),
        ]
    lines += ["", "## Groups", ""]
    rows = []
    for g in rep["groups"]:
        ph = g.get("pct_helping", {})
        rows.append(
            {
                "group": g["label"],
                "n": g["n"],
                "% helping (Table 1)": _pm(ph),
                "final train loss": _pm(g["final_train_loss"]),
                "final test loss": _pm(g["final_test_loss"]),
                "motion changes every (it)": _fmt(g.get("motion_period", {}).get("mean", math.nan)),
                "grad sign changes every (it)": _fmt(g.get("grad_period", {}).get("mean", math.nan)),
                "max |err|": g["max_abs_error"],
                "cum. rel. error": _fmt(g["cumulative_rel_error"]["mean"]),
            }
        )
    lines.append(_table(rows, list(rows[0]) if rows else []))
    for g in rep["groups"]:
        lines += [
            "",
            f"### Per-layer total LCA across seeds — {g['label']} (one-sample t-test vs 0, Holm)",
            "",
            _table(g["layer_effects"], ["layer", "n", "mean", "std", "t", "p", "p_adj", "direction"]),
        ]
        if "estimate" in g:
            lines += [
                "",
                f"Subset estimates (lca.estimate=subset, docs/estimates.md) — {g['label']}: per-layer run "
                "totals with their sampling intervals; the t-tests above use the totals as they are.",
                "",
                _table(
                    g["estimate"],
                    ["layer", "run totals (95 % interval)", "mean SE", "sampling share of between-seed var"],
                ),
            ]
        if "moments" in g:
            m = g["moments"]
            lines += [
                f"Moments of learning ({'per class × layer' if m['per_class'] else 'per layer'}, top "
                f"{m['k']}, first run): {m['actual']} synchronized; shift baseline "
                f"{_fmt(m['baseline_mean'])} ± {_fmt(m['baseline_std'])} over {m['repeats']} shifts; "
                f"p = {_fmt(m['p_value'])} (smallest possible: {_fmt(m['p_floor'])})."
            ]
        if "heavy_tails" in g:
            ht = g["heavy_tails"]
            for side in ("helping", "hurting"):
                s = ht[side]
                lines.append(
                    f"- {side}: Weibull k = {_fmt(s['weibull_k'])}, scale = {_fmt(s['weibull_scale'])} "
                    f"nats; tail mass beyond {ht['gaussian_sigmas']}σ is {_fmt(s['tail_ratio'])}× "
                    "a Gaussian's of the same variance"
                )
    for c in rep["comparisons"]:
        lines += ["", f"## {c['b']}  vs  {c['a']} (Welch t-test)", ""]
        rows = [
            {"metric": m, **{k: c[m][k] for k in ("mean_a", "mean_b", "diff", "t", "p", "direction")}}
            for m in ("final_train_loss", "final_test_loss")
        ]
        lines.append(_table(rows, ["metric", "mean_a", "mean_b", "diff", "t", "p", "direction"]))
        if "layers" in c:
            lines += [
                "Per-layer total LCA (Holm-corrected):",
                "",
                _table(c["layers"], ["layer", "mean_a", "mean_b", "diff", "t", "p_adj", "direction"]),
            ]
    if rep["regressions"]:
        lines += [
            "",
            f"## Regression of total layer LCA on {rep['regressions'][0]['setting']}",
            "",
            _table(rep["regressions"], ["layer", "slope", "intercept", "r2", "p", "n"]),
        ]
    if rep["figures"]:
        lines += ["", "## Figures", ""] + [f"![{f}]({f})" for f in rep["figures"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lca_lab.analyze", description=__doc__.splitlines()[0])
    ap.add_argument("path", type=Path, help="run directory, run file, or multirun directory")
    ap.add_argument("--out", type=Path, default=None, help="where to write report.md/json and figures")
    ap.add_argument("--k", type=int, default=20, help="moments of learning per curve (default 20)")
    ap.add_argument("--repeats", type=int, default=1000, help="shift-baseline repeats (default 1000)")
    ap.add_argument("--alpha", type=float, default=0.05)
    ap.add_argument("--no-figures", action="store_true")
    ap.add_argument("--frames", type=int, default=60, help="frames of the LCA animation GIF (0: none)")
    ap.add_argument(
        "--wandb",
        choices=["auto", "online", "offline", "disabled", "off"],
        default="auto",
        help="log the analysis as a W&B run (job_type analysis) into the runs' W&B group; 'auto' does so "
        "when the runs were tracked with W&B, online with credentials else offline (default auto)",
    )
    a = ap.parse_args(argv)
    if not a.path.exists():
        print(f"error: {a.path} does not exist", file=sys.stderr)
        return 2
    try:
        rep = analyze(
            a.path,
            a.out,
            k=a.k,
            repeats=a.repeats,
            alpha=a.alpha,
            make_figures=not a.no_figures,
            animation_frames=a.frames,
        )
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = a.out or (a.path if a.path.is_dir() else a.path.parent)
    print(render_markdown(rep))
    print(f"report: {out / 'report.md'}  ({len(rep['figures'])} figures)")
    if rep["skipped"]:
        print(
            f"{len(rep['skipped'])} run(s) failed or incomplete, not analysed (listed in report.md):",
            file=sys.stderr,
        )
        for r in rep["skipped"]:
            print(f"  {r['path']}: {r['status']}", file=sys.stderr)
    if a.wandb != "off":
        _log_to_wandb(rep, out, a.wandb)
    return 0


def _log_to_wandb(rep: dict[str, Any], out: Path, mode: str) -> None:
    """The analysis as a W&B run in the group of the analysed runs (the most common one)."""
    tracked: list[dict[str, Any]] = []
    for g in rep["groups"]:
        for p in g["runs"]:
            with open_run(p) as r:
                at = r.attrs
            if at.get("wandb_project"):
                tracked.append(at)
    if not tracked and mode == "auto":
        return  # the runs were not tracked with W&B: nothing to join
    from .tracking import log_analysis

    groups = [t.get("wandb_group") or None for t in tracked]
    group = max(set(groups), key=groups.count) if groups else None
    project = tracked[0]["wandb_project"] if tracked else "lca_lab"
    inputs = [t["wandb_artifact"] for t in tracked if t.get("wandb_artifact")]  # the runs' files
    run_id = log_analysis(
        rep, out, mode=mode, project=project, group=group, **({"inputs": inputs} if inputs else {})
    )
    if run_id:
        where = f"group {group}" if group else "no group (the analysed runs had none)"
        print(f"W&B analysis run {run_id} in project {project}, {where}")


if __name__ == "__main__":
    sys.exit(main())
