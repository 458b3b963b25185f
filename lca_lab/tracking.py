"""Weights & Biases tracking for training runs and analyses (``logger=wandb``).

The training loop never imports wandb: the entry point builds a :class:`WandbTracker` and hands it to
``train.run(..., tracker=...)``, which calls three methods:

- ``log_iteration(it, **values)`` once per LCA iteration. Values are Python numbers or *device* tensors
  (0-d, or a ``{name: 0-d tensor}`` dict such as per-layer LCA). Nothing is read from the device here:
  rows are buffered and every ``logger.log_every`` iterations all buffered tensors are concatenated and
  copied to the host in one transfer, then sent to W&B. So logging adds no host sync per iteration.
- ``log_eval(it, **values)``: test loss / accuracy (Python floats), buffered in order with the rest.
- ``log_summary(summary, run_file)`` at the end (from the entry point): summary values, a per-layer table
  and the run file as an Artifact; ``log_figures(run_dir)`` adds the run's PNG figures;
  ``finish(exit_code)`` (in a ``finally``) flushes and closes the run with its exit status.

Continuity: a resumed run continues its W&B run (:func:`start_tracker` passes the id its run file
records, ``wandb_run_id``, as ``id=…, resume="allow"``). ``log_summary`` records the name of the run
file's Artifact in the run file (``wandb_artifact``) before uploading it, so that a recompute
(:func:`log_recompute`) or an analysis (:func:`log_analysis`) of the run records it as its input
(``use_artifact``; an offline run cannot use artifacts and keeps the names in its config, ``inputs``).

Modes (``logger.mode``): ``auto`` = online when W&B credentials exist (``WANDB_API_KEY`` or a netrc
entry for the server), otherwise offline; an explicit ``WANDB_MODE`` in the environment wins over
``auto``. ``online`` waits at most ``logger.init_timeout`` seconds for the server and falls back to
offline with a message (unreachable server, bad key). Offline runs print where they were written and
the ``wandb sync`` command that uploads them.
"""

from __future__ import annotations

import inspect
import math
import netrc
import os
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from .config import ConfigError

MODES = ("auto", "online", "offline", "disabled")

# Names the training loop uses → W&B keys (the prefix before "/" is the chart section in the W&B UI).
KEYS = {
    "loss": "train/loss",  # L(θ_{t+1}) over the whole training split (= run file train/loss[t+1])
    "batch_loss": "train/batch_loss",
    "lca_total": "lca/total",
    "lca_error": "lca/error",
    "lca_total_se": "lca/total_se",  # standard error of a subset estimate (lca.estimate=subset)
    "splits": "lca/splits",
    "frac_helping": "frac/helping",
    "frac_hurting": "frac/hurting",
    "frac_zero": "frac/zero",
    "layer_lca": "lca_layer",  # a dict {layer: LCA}: one chart per layer, lca_layer/<layer>
    "test_loss": "eval/test_loss",
    "test_acc": "eval/test_acc",
    "train_loss": "eval/train_loss",
    "train_acc": "eval/train_acc",
}


def _print(msg: str) -> None:
    print(f"wandb: {msg}", file=sys.stderr, flush=True)


def has_credentials() -> bool:
    """True when W&B could authenticate without a prompt: an API key in the environment or a netrc
    entry for the server (``WANDB_BASE_URL``, default api.wandb.ai). Reads files only, never the network."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    path = os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_mode(mode: str) -> str:
    """``logger.mode`` → the mode W&B is started in (online / offline / disabled)."""
    if mode not in MODES:
        raise ConfigError(f"logger.mode={mode!r} is not one of {list(MODES)}; e.g. logger.mode=offline")
    if os.environ.get("WANDB_DISABLED", "").lower() in ("true", "1"):
        return "disabled"
    if mode != "auto":
        return mode
    env = os.environ.get("WANDB_MODE", "").lower()
    if env in ("online", "offline", "disabled"):
        return env
    if env == "dryrun":
        return "offline"
    return "online" if has_credentials() else "offline"


def _scalar_leaves(prefix: str, d: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_scalar_leaves(key + "/", v))
        elif isinstance(v, (bool, int, float, str)):
            out[key] = v
    return out


class WandbTracker:
    """One W&B run for one training run (see the module docstring for the call sequence).

    ``lcfg`` is the ``logger`` config group; ``config`` the resolved run config (logged as the W&B
    config); ``run_dir`` the run directory (W&B writes ``<logger.dir or run_dir>/wandb``);
    ``resume_id``: the id of a W&B run to continue (a resumed training run's).
    """

    def __init__(
        self,
        lcfg: dict[str, Any],
        config: dict[str, Any],
        run_dir: str | os.PathLike,
        *,
        group: str | None = None,
        name: str | None = None,
        job_type: str | None = None,
        resume_id: str | None = None,
    ) -> None:
        import wandb  # only when W&B is actually used

        self._wandb = wandb
        self.prefix, self.owned = "", True  # keys as named (KEYS); this tracker finishes its run
        self.log_every = int(lcfg.get("log_every", 50))
        if self.log_every < 1:
            raise ConfigError(f"logger.log_every={self.log_every} must be ≥ 1 (iterations between W&B logs)")
        self.artifact_max_mb = float(lcfg.get("artifact_max_mb", 100) or 0)
        self.images = bool(lcfg.get("images", True))
        self._buffer: list[tuple[int, dict[str, Any]]] = []
        self._n_iters = 0
        self._t_last: float | None = None
        self._it_last = 0
        self.run = None
        self.mode = resolve_mode(str(lcfg.get("mode", "auto")))
        wdir = Path(os.path.expanduser(str(lcfg.get("dir") or run_dir)))
        wdir.mkdir(parents=True, exist_ok=True)
        kwargs = dict(
            project=lcfg.get("project") or "lca_lab",
            entity=lcfg.get("entity") or None,
            group=lcfg.get("group") or group,
            job_type=lcfg.get("job_type") or job_type or "train",
            name=name,
            tags=list(lcfg.get("tags") or []),
            config=config,
            dir=str(wdir),
            # in-process multirun jobs: every job gets a fresh run, never the previous job's
            reinit="create_new",
        )
        if resume_id:  # a resumed training run: the same W&B run, continued
            kwargs.update(id=str(resume_id), resume="allow")
        timeout = float(lcfg.get("init_timeout", 30))
        if self.mode == "online":
            try:
                self.run = wandb.init(mode="online", settings=wandb.Settings(init_timeout=timeout), **kwargs)
            except Exception as e:  # CommError (unreachable, timeout), AuthenticationError (bad key), ...
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                _print(f"could not start an online run ({type(e).__name__}: {first}); logging offline")
                self.mode = "offline"
        if self.run is None:
            try:
                self.run = wandb.init(mode=self.mode, **kwargs)
            except Exception as e:  # tracking must never stop a training run
                _print(f"W&B could not start ({type(e).__name__}: {e}); training continues without it")
                self.mode = "failed"
                return
        if self.mode == "offline":
            d = Path(self.run.dir).parent  # …/wandb/offline-run-<time>-<id>
            _print(f"offline run written to {d}\nwandb: upload it later with: wandb sync {d}")
        self.run.define_metric("iteration")
        self.run.define_metric("*", step_metric="iteration")

    @classmethod
    def attach(cls, run: Any, log_every: int = 50, prefix: str = "lca_lab/") -> WandbTracker:
        """A tracker that logs into a W&B run someone else started and will finish (Lightning's
        ``WandbLogger``, Hugging Face's W&B integration): every key under ``prefix`` (``lca_lab/lca/total``,
        step metric ``lca_lab/iteration``), so none collides with the trainer's own; :meth:`finish` only
        flushes."""
        import wandb

        self = cls.__new__(cls)
        self._wandb, self.run, self.mode, self.prefix, self.owned = wandb, run, "attached", prefix, False
        self.log_every, self.artifact_max_mb, self.images = int(log_every), 0.0, True
        self._buffer, self._n_iters, self._t_last, self._it_last = [], 0, None, 0
        run.define_metric(f"{prefix}iteration")
        run.define_metric(f"{prefix}*", step_metric=f"{prefix}iteration")
        return self

    # -- what the run file records about this W&B run -------------------------------------------------
    @property
    def attrs(self) -> dict[str, str]:
        if self.run is None:
            return {}
        return {
            "wandb_project": str(self.run.project or ""),
            "wandb_group": str(self.run.group or ""),
            "wandb_run_id": str(self.run.id),
            "wandb_mode": self.mode,
            "wandb_dir": str(Path(self.run.dir).parent),
        }

    # -- training loop ---------------------------------------------------------------------------------
    def log_iteration(self, it: int, **values: Any) -> None:
        """Buffer one LCA iteration (``it`` = training iteration of the row, ``lca/iteration``)."""
        if self.run is None:
            return
        if self._t_last is None:
            self._t_last, self._it_last = time.perf_counter(), it
        self._buffer.append((it, values))
        self._n_iters += 1
        if self._n_iters % self.log_every == 0:
            self.flush(rate_at=it)

    def log_eval(self, it: int, **values: Any) -> None:
        """Buffer an evaluation at iteration count ``it`` (``eval/iteration``); NaN values are skipped."""
        if self.run is None:
            return
        self._buffer.append((it, {k: v for k, v in values.items() if not _isnan(v)}))

    def flush(self, rate_at: int | None = None) -> None:
        """Send every buffered row: one device→host copy for all buffered tensors, then one log per row."""
        if self.run is None or not self._buffer:
            return
        import torch

        tensors, slots = [], []  # slots: (row, key, offset) for each tensor value
        n = 0
        for r, (_, values) in enumerate(self._buffer):
            for k, v in values.items():
                for kk, vv in v.items() if isinstance(v, dict) else [(None, v)]:
                    if isinstance(vv, torch.Tensor):
                        tensors.append(vv.detach().reshape(-1)[:1].to(torch.float64))
                        slots.append((r, k, kk, n))
                        n += 1
        host = torch.cat(tensors).cpu().tolist() if tensors else []
        rows: list[dict[str, Any]] = [{} for _ in self._buffer]
        for r, (_, values) in enumerate(self._buffer):
            for k, v in values.items():
                if isinstance(v, dict):
                    for kk, vv in v.items():
                        if not isinstance(vv, torch.Tensor):
                            rows[r][f"{KEYS.get(k, k)}/{kk}"] = vv
                elif not isinstance(v, torch.Tensor):
                    rows[r][KEYS.get(k, k)] = v
        for r, k, kk, i in slots:
            rows[r][f"{KEYS.get(k, k)}/{kk}" if kk is not None else KEYS.get(k, k)] = host[i]
        if rate_at is not None and self._t_last is not None:
            now = time.perf_counter()
            if now > self._t_last and rate_at > self._it_last:
                rows[-1]["perf/iters_per_s"] = (rate_at - self._it_last) / (now - self._t_last)
            self._t_last, self._it_last = now, rate_at
        pre = self.prefix
        for (it, _), row in zip(self._buffer, rows):
            self.run.log({f"{pre}iteration": it, **{pre + k: v for k, v in row.items()}})
        self._buffer.clear()

    # -- end of run (called by the entry point) ---------------------------------------------------------
    def log_summary(self, summary: dict[str, Any], run_file: str | os.PathLike | None = None) -> None:
        """Summary values, a per-layer table, and the run file as an Artifact (if ≤ artifact_max_mb)."""
        if self.run is None:
            return
        self.flush()
        wandb = self._wandb
        flat = _scalar_leaves("", summary)
        self.run.summary.update({self.prefix + k: v for k, v in flat.items()})
        layers = summary.get("layer_lca") or {}
        if layers:
            table = wandb.Table(columns=["layer", "index", "total_lca"])
            for i, (name, v) in enumerate(layers.items()):
                table.add_data(name, i, float(v))
            self.run.log({f"{self.prefix}summary/layer_lca": table})
        if run_file and self.artifact_max_mb > 0:
            p = Path(run_file)
            size_mb = p.stat().st_size / 1e6 if p.exists() else math.inf
            if size_mb <= self.artifact_max_mb:
                from .store import set_attrs

                name = artifact_name(self.run.id)
                set_attrs(p, {"wandb_artifact": f"{name}:latest"})  # the file names its own Artifact
                meta = {"bytes": p.stat().st_size}
                art = wandb.Artifact(name, type="lca-run", metadata=meta)
                art.add_file(str(p), name="lca.h5")
                self.run.log_artifact(art)
            elif p.exists():
                _print(
                    f"run file {p} is {size_mb:.0f} MB > logger.artifact_max_mb={self.artifact_max_mb:g}: "
                    "not uploaded as an Artifact (raise the limit to upload it)"
                )

    def log_figures(self, run_dir: str | os.PathLike) -> int:
        """Log the PNG figures in ``run_dir`` as images (``figures/<name>``); returns how many."""
        if self.run is None or not self.images:
            return 0
        pngs = sorted(Path(run_dir).glob("*.png"))
        if pngs:
            self.run.log({f"{self.prefix}figures/{p.stem}": self._wandb.Image(str(p)) for p in pngs})
        return len(pngs)

    def use_inputs(self, artifacts: list[str]) -> None:
        """Record ``artifacts`` (names like ``lca-run-<id>:latest``) as this run's inputs: W&B lineage with
        ``use_artifact`` online; an offline run cannot use artifacts, so its config keeps the names."""
        if self.run is None or not artifacts:
            return
        self.run.config.update({"inputs": list(artifacts)}, allow_val_change=True)
        if self.mode != "online":
            _print(f"{self.mode} run: inputs {', '.join(artifacts)} recorded in its config (inputs) only")
            return
        for name in artifacts:
            try:
                self.run.use_artifact(name)
            except Exception as e:  # not uploaded (offline training run, too big): tracking never stops us
                _print(f"could not record {name} as an input ({type(e).__name__}: {e})")

    def finish(self, exit_code: int = 0) -> None:
        """Flush what is buffered and close the run; a non-zero exit code marks the W&B run failed."""
        if self.run is None:
            return
        if not self.owned:  # the trainer's run: it finishes it
            self.flush()
            self.run = None
            return
        try:
            self.flush()
        except Exception as e:  # e.g. a device error: the run still has to be closed with its state
            _print(f"could not send the last buffered rows ({type(e).__name__}: {e})")
        self.run.summary["exit_code"] = int(exit_code)
        self.run.finish(exit_code=int(exit_code))
        self.run = None


def _isnan(v: Any) -> bool:
    return isinstance(v, float) and math.isnan(v)


def artifact_name(run_id: str) -> str:
    """The name of a training run's run-file Artifact."""
    return f"lca-run-{run_id}"


def tracked_attrs(run_file: str | os.PathLike) -> dict[str, Any]:
    """The ``wandb_*`` attributes of a run file whose run was tracked (a W&B run started), else {}."""
    from .store import open_run

    with open_run(run_file) as r:
        attrs = r.attrs
    if not attrs.get("wandb_run_id") or attrs.get("wandb_mode") in ("disabled", "failed"):
        return {}
    return {k: v for k, v in attrs.items() if k.startswith("wandb_")}


def start_tracker(factory: Any, resumed_file: str | os.PathLike | None) -> Any:
    """Call a tracker factory; for a resumed run (``resumed_file``: its run file) with the id of the W&B
    run it recorded (``resume_id``), so that the W&B run continues."""
    stored = tracked_attrs(resumed_file) if resumed_file is not None else {}
    try:
        takes_id = "resume_id" in inspect.signature(factory).parameters or any(
            p.kind is p.VAR_KEYWORD for p in inspect.signature(factory).parameters.values()
        )
    except (TypeError, ValueError):  # no signature to read (a builtin): call it plainly
        takes_id = False
    if stored and takes_id:
        return factory(resume_id=stored["wandb_run_id"])
    return factory()


def log_recompute(run_file: str | os.PathLike, merged: str | os.PathLike, mode: str = "auto") -> str | None:
    """A recompute of a tracked training run as a W&B run (job_type ``recompute``) in the training run's
    project and group: the training run's Artifact as its input, the merged file's summary. Returns the
    W&B run id, or None when the training run was not tracked (no W&B run is made then)."""
    stored = tracked_attrs(run_file)
    if not stored:
        return None
    from .store import open_run

    with open_run(merged) as r:
        summary = {k[len("summary/") :]: v for k, v in r.attrs.items() if k.startswith("summary/")}
    lcfg = {"mode": mode, "project": stored.get("wandb_project") or "lca_lab", "images": False}
    config = {"run": str(run_file), "merged": str(merged), "training_run_id": stored["wandb_run_id"]}
    out = Path(merged).parent
    name = f"recompute {stored['wandb_run_id']}"
    tr = WandbTracker(
        lcfg, config, out, group=stored.get("wandb_group") or None, name=name, job_type="recompute"
    )
    if tr.run is None:
        return None
    code = 1
    try:
        tr.use_inputs([stored["wandb_artifact"]] if stored.get("wandb_artifact") else [])
        tr.run.summary.update(_scalar_leaves("", summary))
        code = 0
        return tr.run.id
    finally:
        tr.finish(code)


def log_analysis(
    report: dict[str, Any],
    out: str | os.PathLike,
    *,
    mode: str,
    project: str,
    group: str | None,
    entity: str | None = None,
    init_timeout: float = 30,
    inputs: list[str] | None = None,
) -> str | None:
    """Log an ``analyze`` report as a W&B run (job_type ``analysis``) into ``group``: the group table,
    per-layer effect tables, regressions and the PNG figures in ``out``; ``inputs``: the analysed runs'
    Artifacts (:meth:`WandbTracker.use_inputs`). Returns the W&B run id."""
    lcfg = {"mode": mode, "project": project, "entity": entity, "init_timeout": init_timeout, "images": True}
    tr = WandbTracker(lcfg, {"path": report["path"]}, out, group=group, name="analysis", job_type="analysis")
    if tr.run is None:
        return None
    wandb = tr._wandb
    code = 0
    try:
        tr.use_inputs(list(inputs or []))
        cols = ["group", "n", "pct_helping_mean", "pct_helping_std", "final_train_loss", "final_test_loss"]
        t = wandb.Table(columns=cols)
        for g in report["groups"]:
            ph = g.get("pct_helping", {})
            t.add_data(
                g["label"], g["n"], ph.get("mean"), ph.get("std"),
                g["final_train_loss"]["mean"], g["final_test_loss"]["mean"],
            )  # fmt: skip
        payload: dict[str, Any] = {"analysis/groups": t}
        for i, g in enumerate(report["groups"]):
            rows = g.get("layer_effects") or []
            if rows:
                c = ["layer", "n", "mean", "std", "t", "p", "p_adj", "direction"]
                lt = wandb.Table(columns=["group", *c])
                for r in rows:
                    lt.add_data(g["label"], *[r.get(k) for k in c])
                payload[f"analysis/layer_effects_{i}"] = lt
        if report.get("regressions"):
            c = ["setting", "layer", "slope", "intercept", "r2", "p", "n"]
            rt = wandb.Table(columns=c)
            for r in report["regressions"]:
                rt.add_data(*[r.get(k) for k in c])
            payload["analysis/regressions"] = rt
        skipped = report.get("skipped") or []
        st = wandb.Table(columns=["path", "status"])
        for s in skipped:
            st.add_data(s["path"], s["status"])
        payload["analysis/skipped"] = st
        tr.run.log(payload)
        tr.run.summary.update({"n_runs": report["n_runs"], "n_skipped": len(skipped)})
        tr.log_figures(out)
        return tr.run.id
    except Exception:
        code = 1
        raise
    finally:
        tr.finish(code)
