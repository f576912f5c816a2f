"""SIGKILL during fit at several points, rerun the same command: it continues from the last checkpoint, and its
metrics and samples equal an uninterrupted run's. Runs use deterministic=true (set by the CLI before torch
loads, so the environment here leaves it out) on a config whose parameters change every step, so equality shows
an exact resume, not a lucky one."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

ARGS = ["--steps", "6", "--quiet", "--set", "group_size=4", "--set", "prompts_per_step=2", "--set",
        "max_new_tokens=10", "--set", "lr=1e-2", "--set", "save_every=2", "--set", "sample_every=2",
        "--set", "deterministic=true"]
VOLATILE = ("time/", "mem/")
ENV = {k: v for k, v in os.environ.items() if k not in ("MKL_CBWR", "CUBLAS_WORKSPACE_CONFIG")}


def command(model, out):
    return [sys.executable, "-m", "tinyrl.cli", "fit", "toy", "--model", model, "--out", out, *ARGS]


def metrics(run, name="metrics.jsonl"):
    with open(os.path.join(run, name)) as f:
        rows = [json.loads(line) for line in f]
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in rows]


def outputs(run):
    """Everything a run logs but its timings and memory peaks: metrics.jsonl and samples.jsonl."""
    return metrics(run), metrics(run, "samples.jsonl")


def lines(path):
    try:  # a rerun of a run with no checkpoint yet deletes its metrics at start, maybe between two reads here
        with open(path) as f:
            return sum(1 for line in f if line.endswith("\n"))
    except FileNotFoundError:
        return 0


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory):
    run = str(tmp_path_factory.mktemp("ref") / "run")
    subprocess.run(command(tiny_model, run), check=True, capture_output=True, env=ENV)
    rows, samples = outputs(run)
    assert all(r["grad_norm"] > 0 and r["groups/frac_zero_var"] < 1 for r in rows)  # every step moves the weights
    again = str(tmp_path_factory.mktemp("again") / "run")
    subprocess.run(command(tiny_model, again), check=True, capture_output=True, env=ENV)
    assert outputs(again) == (rows, samples)  # two uninterrupted runs agree bitwise
    return rows, samples


def kill_after(cmd, path, n_lines, timeout=120):
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.time() + timeout
    while lines(path) < n_lines and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_sigkill_at_several_points_then_rerun_matches_uninterrupted(tiny_model, tmp_path, reference):
    run = str(tmp_path / "run")
    path = os.path.join(run, "metrics.jsonl")
    for kill_at in (1, 3, 5):  # before the first checkpoint, between checkpoints, just after one
        kill_after(command(tiny_model, run), path, kill_at)
    assert len(reference[0]) == 6
    done = subprocess.run(command(tiny_model, run), capture_output=True, text=True, env=ENV)
    assert done.returncode == 0, done.stderr[-2000:]
    assert outputs(run) == reference
    assert not [d for d in os.listdir(os.path.join(run, "checkpoints")) if d.startswith(".tmp")]


def test_crash_inside_a_checkpoint_write_leaves_the_previous_one(tiny_model, tmp_path, reference):
    run = str(tmp_path / "run")
    for point, survivor in (("before-rename:4", "step-000002"), ("before-latest:6", "step-000004")):
        crashed = subprocess.run(command(tiny_model, run), env={**ENV, "TINYRL_CRASH_AT": point},
                                 capture_output=True)
        assert crashed.returncode == -signal.SIGKILL
        with open(os.path.join(run, "checkpoints", "latest")) as f:
            assert f.read().strip() == survivor  # the half-written checkpoint is never pointed at
    done = subprocess.run(command(tiny_model, run), capture_output=True, text=True, env=ENV)
    assert done.returncode == 0, done.stderr[-2000:]
    assert outputs(run) == reference


def test_memory_survives_a_crash_exactly(tiny_model, tmp_path):
    extra = ["--method", "memory-r+", "--set", "encoder=hashing", "--set", "explore_warmup=2", "--set",
             "memory_order=read-before-write"]
    ref = str(tmp_path / "ref")
    subprocess.run(command(tiny_model, ref) + extra, check=True, capture_output=True, env=ENV)
    run = str(tmp_path / "run")
    crashed = subprocess.run(command(tiny_model, run) + extra, env={**ENV, "TINYRL_CRASH_AT": "before-latest:4"},
                             capture_output=True)
    assert crashed.returncode == -signal.SIGKILL
    done = subprocess.run(command(tiny_model, run) + extra, capture_output=True, text=True, env=ENV)
    assert done.returncode == 0, done.stderr[-2000:]
    assert outputs(run) == outputs(ref)  # includes memory sizes and exploit/explore rewards of every step
    assert metrics(run)[-1]["memory/failure_values"] == 6 * 2 * 4  # nothing lost or duplicated: 6 steps x P x G
