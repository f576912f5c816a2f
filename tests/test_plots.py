"""`tinyrl report RUN [RUN ...]`: the text report of each run and PNG plots, several runs overlaid."""

import os
import subprocess
import sys

import pytest

from tinyrl import loop, meter, plots
from tinyrl.config import Config

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def two_runs(tiny_model, tmp_path_factory):
    """An r1 run and a memory-r+ run of the tiny model, 6 steps each, with held-out evaluation every 3."""
    root = tmp_path_factory.mktemp("runs")
    common = dict(task="arith", model=tiny_model, steps=6, prompts_per_step=2, group_size=4, max_new_tokens=12,
                  lr=1e-2, eval_every=3, eval_limit=4)
    r1 = loop.fit(Config(out=str(root / "r1"), **common), quiet=True)
    mem = loop.fit(Config(out=str(root / "mem"), method="memory-r+", encoder="hashing", explore_warmup=3,
                          memory_order="read-before-write", **common), quiet=True)
    return r1, mem


def test_report_on_two_runs_writes_readable_pngs(two_runs):
    pytest.importorskip("matplotlib")
    r1, mem = two_runs
    done = subprocess.run([sys.executable, "-m", "tinyrl.cli", "report", r1, mem], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    folder = os.path.join(r1, "plots-vs-mem")
    names = {"rewards.png", "learning.png", "memory.png", "cost.png"}
    assert set(os.listdir(folder)) == names
    for name in names:
        with open(os.path.join(folder, name), "rb") as f:
            data = f.read()
        assert data.startswith(PNG) and len(data) > 10_000, name  # a real picture, not an empty canvas
        assert f"wrote {os.path.join(folder, name)}" in done.stdout
    assert done.stdout.count(": 6 steps") == 2  # the text report of both runs comes first


def test_a_run_without_memory_gets_no_memory_plot_and_no_plots_is_text_only(two_runs, tmp_path):
    pytest.importorskip("matplotlib")
    r1, _ = two_runs
    written = plots.write({"r1": meter.read_jsonl(os.path.join(r1, "metrics.jsonl"))}, str(tmp_path / "p"))
    assert sorted(os.path.basename(p) for p in written) == ["cost.png", "learning.png", "rewards.png"]
    done = subprocess.run([sys.executable, "-m", "tinyrl.cli", "report", r1, "--no-plots"], capture_output=True,
                          text=True)
    assert done.returncode == 0 and "wrote" not in done.stdout and not os.path.exists(os.path.join(r1, "plots"))


def test_without_matplotlib_the_report_says_how_to_get_plots(two_runs, tmp_path):
    r1, _ = two_runs
    hide = str(tmp_path / "hide")  # a matplotlib package that fails to import shadows the real one
    os.makedirs(os.path.join(hide, "matplotlib"))
    with open(os.path.join(hide, "matplotlib", "__init__.py"), "w") as f:
        f.write("raise ImportError('hidden by the test')\n")
    env = {**os.environ, "PYTHONPATH": hide + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-m", "tinyrl.cli", "report", r1], capture_output=True, text=True, env=env)
    assert done.returncode == 0 and "pip install 'tinyrl[plots]'" in done.stderr and "wrote" not in done.stdout


def test_moving_average_by_hand():
    assert plots.moving_average([2.0, 4.0, 6.0], 3) == [2.0, 3.0, 4.0]


def synthetic(steps=10, toy=False, memory=True):
    rows = []
    for s in range(1, steps + 1):
        row = {"step": s, "reward/total": s / steps, "correct": 0.0 if toy else s / 20, "len/mean": 30.0 - s,
               "time/generate": 2.0, "time/train": 1.0, "time/score": 0.1, "mem/generate": 2**30,
               "mem/train": 2**31, "plan/generate": 2**30, "plan/train": 2**31}
        row.update({"reward/digits": s / steps} if toy else {"reward/correctness": s / 10})
        if memory:
            row.update({"time/memory": 0.2, "memory/success_keys": s, "memory/failure_keys": 2 * s,
                        "memory/success_values": s, "memory/failure_values": 3 * s})
        rows.append(row)
    return rows


def drawn(monkeypatch, runs, tmp_path):
    """plots.write's figures, by file name, kept open for inspection."""
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    figures = {}
    monkeypatch.setattr(plt, "close", lambda fig: figures.setdefault(len(figures), fig))
    paths = plots.write(runs, str(tmp_path))
    return {os.path.basename(p): figures[i] for i, p in enumerate(paths)}


def test_plots_tick_whole_steps_colour_one_runs_curves_apart_and_keep_legends_off_the_data(monkeypatch, tmp_path):
    figures = drawn(monkeypatch, {"a": synthetic(4)}, tmp_path / "one")
    for fig in figures.values():
        for ax in fig.axes:
            if ax.get_visible():
                assert all(float(t).is_integer() for t in ax.get_xticks()), ax.get_title()
    memory = figures["memory.png"].axes[0]
    assert len({line.get_color() for line in memory.get_lines()}) == 2  # success and failure, one run
    cost = drawn(monkeypatch, {"a": synthetic(), "b": synthetic()}, tmp_path / "two")["cost.png"]
    cost.canvas.draw()
    for ax in cost.axes:
        legend = ax.get_legend()
        if legend is not None and len(legend.get_texts()) > 3:
            assert legend.get_window_extent().x0 >= ax.get_window_extent().x1  # beside the axes, not on the data


def test_a_toy_run_draws_and_reports_no_correctness(monkeypatch, tmp_path):
    figures = drawn(monkeypatch, {"toy": synthetic(toy=True, memory=False)}, tmp_path)
    titles = [ax.get_title() for ax in figures["learning.png"].axes if ax.get_visible()]
    assert titles and not any(t.startswith("correct") for t in titles)
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(__import__("json").dumps(r) + "\n" for r in synthetic(toy=True)))
    text = meter.report(str(run))
    assert "reward/digits" in text and " correct " not in text
