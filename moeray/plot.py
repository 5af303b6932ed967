"""`moeray plot`: PNGs of a placement report (moeray.serving.placement_report).

    paths = plot_report(report, "out/")    # expert-load.png, worker-load.png, imbalance-timeline.png,
                                           # placement-overview.png (the three side by side)

- expert load: heatmap of layers x experts over the coordinator's window (colour bar: routed
  (token, expert) pairs), hot experts' replica counts written in when the grid is small enough;
- worker load: each worker's load relative to the mean worker (summed over layers), in the window
  before the last rebalance and in the first window after it (realised rows), or the current
  window's when nothing was rebalanced yet;
- imbalance over time: the realised imbalance over the window ending at each snapshot range and
  of each range alone (mean over layers and the worst layer), each committed rebalance marked with its version, its predicted imbalance after
  and the realised one (over the first window after it).

Matplotlib's object API on the Agg canvas (no pyplot, no display, no global backend switch).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from placement.metrics import imbalance_of_worker_loads

_DPI = 110
_ANNOTATE_MAX_CELLS = 16 * 40  # replica counts are written in on grids up to this size


def _title(report: dict) -> str:
    model = report["model"]
    name = model.get("name") or model.get("architecture", "model")
    arch = f" ({model['architecture']})" if model.get("architecture") and model["architecture"] != name else ""
    return f"{name}{arch}, placement v{report['placement_version']}"


def draw_expert_load(ax, report: dict) -> None:
    load_LE = np.array([layer["expert_load"] for layer in report["layers"]], dtype=np.float64)
    replicas_LE = np.array([layer["replicas"] for layer in report["layers"]])
    num_layers, num_experts = load_LE.shape
    image = ax.imshow(load_LE, aspect="auto", cmap="viridis", interpolation="nearest")
    source = (f"last {report['window_steps']} steps" if report.get("load_source") == "window"
              else "since start-up")
    ax.figure.colorbar(image, ax=ax, label=f"routed (token, expert) pairs, {source}")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_yticks(range(num_layers))
    if num_experts <= 64:
        ax.set_xticks(range(num_experts))
        ax.tick_params(axis="x", labelsize=7 if num_experts > 24 else 9)
    if load_LE.size <= _ANNOTATE_MAX_CELLS:
        threshold = load_LE.max() * 0.6
        for layer, expert in zip(*np.nonzero(replicas_LE > 1)):
            ax.text(expert, layer, f"x{replicas_LE[layer, expert]}", ha="center", va="center", fontsize=7,
                    color="black" if load_LE[layer, expert] > threshold else "white")
    ax.set_title("expert load per layer" + (" (xN: replicas)" if (replicas_LE > 1).any() else ""))


def _relative(load_LW) -> np.ndarray:
    """Each worker's load (summed over layers) / the mean worker's."""
    per_worker = np.asarray(load_LW, dtype=np.float64).sum(axis=0)
    mean = per_worker.mean()
    return per_worker / mean if mean > 0 else np.ones_like(per_worker)


def draw_worker_load(ax, report: dict) -> None:
    last = report.get("last_rebalance")
    workers = np.arange(report["num_workers"])
    ax.axhline(1.0, color="grey", linestyle=":", linewidth=1)
    if last is None or last.get("before_worker_load") is None:
        current_LW = [layer["worker_load"] for layer in report["layers"]]
        ax.bar(workers, _relative(current_LW), color="tab:blue", label="current window")
        ax.set_title("worker load (no rebalance committed yet)" if last is None else "worker load, current window")
    else:
        width = 0.4
        before = _relative(last["before_worker_load"])
        before_imbalance = imbalance_of_worker_loads(np.asarray(last["before_worker_load"], dtype=np.float64)).mean()
        ax.bar(workers - width / 2, before, width, color="tab:grey",
               label=f"before (v{last['before_version']}, {last['before_steps']} steps): {before_imbalance:.2f}")
        if last.get("after_worker_load") is not None:
            after_LW = np.asarray(last["after_worker_load"], dtype=np.float64)
            after = _relative(after_LW)
            ax.bar(workers + width / 2, after, width, color="tab:green",
                   label=f"after (v{last['version']}, {last['after_steps']} steps): "
                         f"{imbalance_of_worker_loads(after_LW).mean():.2f}")
        else:
            ax.text(0.5, 0.92, f"no step range served on v{last['version']} yet", transform=ax.transAxes,
                    ha="center", fontsize=9)
        ax.set_title(f"worker load before / after the rebalance to v{last['version']} "
                     f"(step {last['committed_at_step']})")
        ax.set_ylim(top=1.3 * max(ax.get_ylim()[1], 1.0))  # room for the legend above the bars
        ax.legend(title="realised, mean layer imbalance", fontsize=8, title_fontsize=8, loc="upper right")
    ax.set_xticks(workers)
    ax.set_xlabel("worker")
    ax.set_ylabel("load / mean worker load (all layers)")


def draw_imbalance_timeline(ax, report: dict) -> None:
    timeline = report.get("timeline") or {}
    steps = timeline.get("step_hi") or []
    ax.set_xlabel("engine step")
    ax.set_ylabel("imbalance (max / mean worker load)")
    ax.set_title("realised imbalance over time")
    if not steps:
        ax.text(0.5, 0.5, "no snapshot range completed yet" if timeline else "no coordinator: no timeline",
                transform=ax.transAxes, ha="center", va="center")
        return
    # A range's value holds over its steps (step_lo, step_hi]: drawn as steps, not as a ramp. Bold:
    # over the window ending there (what moeray:expert_imbalance reports); faint: each range alone.
    xs = [timeline["step_lo"][0], *steps]
    window = timeline.get("window_steps")
    for prefix, width, alpha, what in (("", 0.8, 0.35, "each range"), ("window_", 1.8, 1.0, f"{window}-step window")):
        for key, color, layers in (("imbalance_worst", "tab:red", "worst layer"),
                                   ("imbalance_mean", "tab:blue", "mean over layers")):
            values = timeline[prefix + key]
            ax.step(xs, [values[0], *values], where="pre", color=color, linewidth=width, alpha=alpha,
                    label=f"{layers}, {what}")
    ax.axhline(1.0, color="grey", linestyle=":", linewidth=1)
    committed = [r for r in report.get("rebalances", []) if r.get("committed_at_step") is not None]
    for i, record in enumerate(committed):
        step = record["committed_at_step"]
        ax.axvline(step, color="tab:green", linestyle="--", linewidth=1, label="rebalance" if i == 0 else None)
        ax.annotate(f"v{record['version']}", (step, 1.0), xycoords=("data", "axes fraction"), xytext=(2, -10),
                    textcoords="offset points", fontsize=8, color="tab:green")
        ax.scatter([step], [record["predicted_after"]], marker="v", color="tab:green", zorder=3,
                   label="predicted after" if i == 0 else None)
        if record.get("realised_after") is not None:
            # Realised over the first window after the commit: drawn where that window ends, tied to
            # its prediction.
            end = step + record.get("realised_steps", 0)
            ax.plot([step, end], [record["predicted_after"], record["realised_after"]], color="black",
                    linestyle=":", linewidth=0.8)
            ax.scatter([end], [record["realised_after"]], marker="o", facecolors="none", edgecolors="black",
                       zorder=3, label="realised after (first window)" if i == 0 else None)
    ax.set_ylim(bottom=min(0.95, ax.get_ylim()[0]))
    # Below the axes: inside, it would hide the lines or the version labels.
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3, frameon=False)


_PANELS = {
    "expert-load.png": (draw_expert_load, True),
    "worker-load.png": (draw_worker_load, False),
    "imbalance-timeline.png": (draw_imbalance_timeline, False),
}


def _heatmap_size(report: dict) -> tuple[float, float]:
    num_experts, num_layers = report["num_experts"], len(report["layers"])
    return float(np.clip(5 + 0.14 * num_experts, 7, 16)), float(np.clip(2.5 + 0.4 * num_layers, 4, 12))


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=_DPI)
    return path


def plot_report(report: dict, out_dir: str | Path) -> list[Path]:
    """Write the three plots and an overview of them to out_dir; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, (draw, is_heatmap) in _PANELS.items():
        fig = Figure(figsize=_heatmap_size(report) if is_heatmap else (8, 4.5), layout="constrained")
        draw(fig.add_subplot(), report)
        fig.suptitle(_title(report))
        paths.append(_save(fig, out / name))
    paths.append(plot_overview(report, out / "placement-overview.png"))
    return paths


def plot_overview(report: dict, path: str | Path) -> Path:
    """The three panels in one figure, the heatmap on top (the example image in docs/)."""
    _, height = _heatmap_size(report)
    fig = Figure(figsize=(14, height + 4.5), layout="constrained")
    axes = fig.subplot_mosaic([["heat", "heat"], ["workers", "timeline"]], height_ratios=[height, 4.5])
    for key, (draw, _) in zip(("heat", "workers", "timeline"), _PANELS.values()):
        draw(axes[key], report)
    fig.suptitle(_title(report))
    return _save(fig, Path(path))
