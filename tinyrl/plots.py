"""Plots of runs: PNGs of what metrics.jsonl holds, several runs overlaid (r1 against memory-r+, say).

Rows in (each run's metrics, read by the caller), files out: `write({label: rows}, folder)` draws

- `rewards.png`: the total and every reward component;
- `learning.png`: training correctness, held-out accuracy (eval_every), completion length with the share that hit
  the cap, the KL to the reference, and the share of zero-variance groups;
- `memory.png` (memory methods): both memories' sizes, with the stretch where explore is on shaded;
- `cost.png`: seconds per step by phase, and peak memory by phase next to the planner's figures (--vram).

Each curve is the raw value, faint, under its moving average over about a twentieth of the run. matplotlib is an
optional extra (`pip install 'tinyrl[plots]'`), imported here only when asked, with the file-only Agg backend.
"""

from __future__ import annotations

import os

from tinyrl.errors import UserError

GiB = 2 ** 30
STYLES = ("-", "--", ":", "-.")  # one per phase, or per metric sharing an axis


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def write(runs: dict[str, list[dict]], folder: str) -> list[str]:
    """Draw every figure that has data into `folder` (created); returns the paths written."""
    if not available():
        raise UserError("plots need matplotlib: pip install 'tinyrl[plots]' (or pip install matplotlib)")
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, none opened
    import matplotlib.pyplot as plt

    from matplotlib.ticker import MaxNLocator

    os.makedirs(folder, exist_ok=True)
    keys = set().union(*(row for rows in runs.values() for row in rows))
    if not any(answers_checked(rows) for rows in runs.values()):
        keys.discard("correct")  # toy runs: no answers, `correct` is 0 by definition
    rewards = ["reward/total"] + sorted(k for k in keys if k.startswith("reward/") and k != "reward/total")
    figures = {
        "rewards.png": [(k[len("reward/"):], [(k, "")]) for k in rewards],
        "learning.png": [("correct (training samples)", [("correct", "")]),
                         ("held-out accuracy", [("eval/extractive_match", "extractive"),
                                                ("eval/exact_match", "exact")]),
                         ("completion length (tokens)", [("len/mean", "")]),
                         ("share of completions at the length cap", [("len/frac_at_cap", "")]),
                         ("KL to the reference", [("kl", "")]),
                         ("share of groups with equal rewards", [("groups/frac_zero_var", "")])],
        "memory.png": [("questions in memory", [("memory/success_keys", "success"),
                                                 ("memory/failure_keys", "failure")]),
                       ("traces in memory", [("memory/success_values", "success"),
                                             ("memory/failure_values", "failure")])],
        "cost.png": [("seconds per step, by phase", [(f"time/{p}", p) for p in ("generate", "train", "memory",
                                                                                 "score")]),
                     ("peak memory by phase (GiB)", [("mem/generate", "generate"), ("mem/train", "train"),
                                                     ("plan/generate", "planned generate"),
                                                     ("plan/train", "planned train")])],
    }
    written = []
    for name, panels in figures.items():
        panels = [(title, [(k, label) for k, label in series if k in keys]) for title, series in panels]
        panels = [(title, series) for title, series in panels if series]
        if not panels:
            continue  # e.g. memory.png for runs without a memory method
        cols = 2 if len(panels) > 1 else 1
        rows_n = (len(panels) + cols - 1) // cols
        fig, axes = plt.subplots(rows_n, cols, figsize=(6.4 * cols, 3.2 * rows_n), squeeze=False)
        for ax, (title, series) in zip(axes.flat, panels):
            draw(ax, runs, series, scale=1 / GiB if title.startswith("peak memory") else 1.0)
            if name == "memory.png":
                shade_explore(ax, runs)
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("step", fontsize=8)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole: no 1.25 ticks
            ax.tick_params(labelsize=8)
            ax.grid(alpha=0.3)
            entries = len(ax.get_legend_handles_labels()[1])
            if entries > 3:  # many curves (two runs' phases): the legend goes beside the axes, not over the data
                ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
            else:
                ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(panels):]:
            ax.set_visible(False)
        fig.suptitle(" vs ".join(runs), fontsize=11)
        fig.tight_layout()
        path = os.path.join(folder, name)
        fig.savefig(path, dpi=90, bbox_inches="tight")  # takes in legends beside the axes
        plt.close(fig)
        written.append(path)
    return written


def answers_checked(rows: list[dict]) -> bool:
    """Whether a run's task checks answers (its `correct` means something): all but the toy task, whose only
    reward is the share of digits."""
    return not rows or "reward/digits" not in rows[0]


def draw(ax, runs: dict[str, list[dict]], series: list[tuple[str, str]], scale: float = 1.0) -> None:
    """Every run's curve of every key in `series` on one axis: colour per run and line style per key; one run:
    a colour per key too, so its curves tell apart at a glance."""
    for run_index, (run, rows) in enumerate(runs.items()):
        for key_index, (style, (key, label)) in enumerate(zip(STYLES, series)):
            color = key_index if len(runs) == 1 else run_index
            points = [(r["step"], r[key] * scale) for r in rows if r.get(key) is not None]
            if not points:
                continue
            steps, values = zip(*points)
            name = run if len(series) == 1 else f"{run}: {label}"
            if len(points) < 8:  # few points (evaluations): markers, no smoothing
                ax.plot(steps, values, style, marker="o", color=f"C{color}", label=name)
                continue
            ax.plot(steps, values, style, color=f"C{color}", alpha=0.25, linewidth=0.8)
            ax.plot(steps, moving_average(values, max(1, len(values) // 20)), style, color=f"C{color}", label=name)


def shade_explore(ax, runs: dict[str, list[dict]]) -> None:
    """Shade the steps from which each run's explore reward was on (memory-r+ past its warm-up)."""
    for color, (run, rows) in enumerate(runs.items()):
        on = [r["step"] for r in rows if r.get("memory/explore_on")]
        if on:
            ax.axvspan(min(on), max(on), color=f"C{color}", alpha=0.08, label=f"{run}: explore on")


def moving_average(values, window: int) -> list[float]:
    """Trailing mean over the last `window` values (fewer at the start).

    >>> moving_average([1.0, 2.0, 3.0, 4.0], 2)
    [1.0, 1.5, 2.5, 3.5]
    """
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out
