"""``diffpolicy compare``: one table and one plot over run directories.

Each run directory (of ``train_offline`` or ``train_online``) holds ``config.json`` and
``eval.csv``; runs with the same label (default: the agent's name, plus the dataset when the
runs use several) are seeds of one method: the table gives the final normalised score as mean ±
population std over them (as the benchmarks' tables do), the best evaluation, and the number of
runs; the plot shows the mean curve with a band of ± one std (offline runs against gradient
steps, online runs against environment steps).
"""
from __future__ import annotations

import csv
import json
import math
import pathlib
import statistics
import warnings

from diffpolicy.agents import ONLINE_AGENTS as ONLINE
from diffpolicy.plotting import png_figure, report_file, seed_spread

__all__ = ["read_run", "compare_runs"]


def read_run(run_dir) -> dict:
    """``{"run", "agent", "dataset", "env_id", "seed", "online", "steps", "scores", "returns"}`` of one run."""
    run = pathlib.Path(run_dir)
    if not (run / "config.json").is_file() or not (run / "eval.csv").is_file():
        raise FileNotFoundError(f"{run} is not an evaluated run directory (needs config.json and eval.csv)")
    meta = json.loads((run / "config.json").read_text())
    with (run / "eval.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{run}/eval.csv has no evaluations yet")
    value = (lambda r, k: float(r[k]) if r.get(k) not in (None, "") else math.nan)
    return {"run": str(run), "agent": meta.get("agent", "?"), "dataset": meta.get("dataset"),
            "env_id": meta.get("env_id"), "seed": meta.get("train", {}).get("seed"),
            "online": meta.get("agent") in ONLINE, "steps": [int(float(r["step"])) for r in rows],
            "scores": [value(r, "score_mean") for r in rows], "returns": [value(r, "return_mean") for r in rows]}


def _label(run: dict, several_datasets: bool) -> str:
    kind = "fine-tuned " if run["online"] else ""
    return f"{kind}{run['agent']}" + (f" ({run['dataset']})" if several_datasets and run["dataset"] else "")


def _mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and population std over seeds (NaNs left out), as the benchmarks' tables report them."""
    xs = [x for x in xs if not math.isnan(x)]
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), statistics.pstdev(xs)


def _settings(run: dict) -> dict:
    """What a run computes, flattened, except its seed: runs of one label should agree on it."""
    meta = json.loads((pathlib.Path(run["run"]) / "config.json").read_text())
    flat = {f"agent.{k}": v for k, v in (meta.get("agent_config") or {}).items()}
    flat.update({f"train.{k}": v for k, v in (meta.get("train") or {}).items() if k != "seed"})
    flat.update({k: meta.get(k) for k in ("agent", "dataset", "env_id")})
    flat["final step"] = run["steps"][-1]
    return flat


def _warn_mixed(label: str, members: list[dict]) -> None:
    settings = [_settings(m) for m in members]
    differ = sorted(k for k in set().union(*settings) if len({json.dumps(s.get(k), sort_keys=True) for s in settings}) > 1)
    if differ:
        warnings.warn(f"the {len(members)} runs labelled {label!r} differ in {', '.join(differ)}, yet are averaged "
                      "as seeds of one method: give each setting its own label (labels=, or --labels)", stacklevel=3)


def compare_runs(run_dirs, out=None, labels: list[str] | None = None) -> dict:
    """The comparison of ``run_dirs``; with ``out`` (a path without suffix) also writes
    ``out.json``, ``out.md`` and ``out.png``. Uses returns where the runs have no reference scores."""
    runs = [read_run(r) for r in run_dirs]
    if labels is not None and len(labels) != len(runs):
        raise ValueError(f"{len(labels)} labels for {len(runs)} runs")
    several = len({r["dataset"] for r in runs}) > 1
    metric = "scores" if all(not math.isnan(r["scores"][-1]) for r in runs) else "returns"
    groups: dict[str, list[dict]] = {}
    for i, r in enumerate(runs):
        groups.setdefault(labels[i] if labels else _label(r, several), []).append(r)
    rows = []
    for label, members in groups.items():
        _warn_mixed(label, members)
        final, final_std = _mean_std([m[metric][-1] for m in members])
        best, _ = _mean_std([max(v for v in m[metric] if not math.isnan(v)) for m in members])
        rows.append({"method": label, "final": final, "final_std": final_std, "best": best, "runs": len(members),
                     "steps": max(m["steps"][-1] for m in members), "online": members[0]["online"],
                     "run_dirs": [m["run"] for m in members]})
    report = {"metric": "normalised score" if metric == "scores" else "return", "rows": rows, "runs": runs}
    if out is not None:
        report_file(out, ".json").parent.mkdir(parents=True, exist_ok=True)
        report_file(out, ".json").write_text(json.dumps(report, indent=1))
        report_file(out, ".md").write_text(markdown(report))
        _plot(groups, metric, report_file(out, ".png"))
    return report


def markdown(report: dict) -> str:
    lines = [f"| method | final {report['metric']} | best | steps | runs |", "|---|---:|---:|---:|---:|"]
    for r in report["rows"]:
        unit = "env steps" if r["online"] else "grad steps"
        lines.append(f"| {r['method']} | {seed_spread(r['final'], r['final_std'], r['runs'])} | {r['best']:.1f} | "
                     f"{r['steps']} {unit} | {r['runs']} |")
    return "\n".join(lines) + "\n"


def _plot(groups: dict, metric: str, path: pathlib.Path) -> None:
    kinds = [k for k in (False, True) if any(m[0]["online"] == k for m in groups.values())]
    with png_figure(path, 1, len(kinds), figsize=(5.5 * len(kinds), 3.8)) as (_, axes):
        for ax, online in zip(axes[0], kinds):
            for label, members in groups.items():
                if members[0]["online"] != online:
                    continue
                n = min(len(m["steps"]) for m in members)
                x = members[0]["steps"][:n]
                ys = [[m[metric][i] for m in members] for i in range(n)]
                mean, std = zip(*(_mean_std(v) for v in ys))
                ax.plot(x, mean, marker="o", ms=3, label=label)
                ax.fill_between(x, [a - b for a, b in zip(mean, std)], [a + b for a, b in zip(mean, std)], alpha=0.2)
            ax.set_xlabel("environment steps" if online else "gradient steps")
            ax.set_ylabel("normalised score" if metric == "scores" else "return")
            ax.set_title("online fine-tuning" if online else "offline training")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
