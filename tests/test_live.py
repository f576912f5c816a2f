"""report_to: every metrics.jsonl key mirrored live to TensorBoard (read back with tensorboard's event reader) and to
W&B in offline mode; a missing package is one line before anything loads."""

import json
import os
import subprocess
import sys

import pytest

from tinyrl import config as config_mod
from tinyrl import loop, meter
from tinyrl.config import Config
from tinyrl.errors import UserError

COMMON = dict(task="arith", steps=3, prompts_per_step=2, group_size=4, max_new_tokens=8, lr=1e-2, save_every=2)


def numeric_keys(run: str) -> tuple[list[dict], set[str]]:
    rows = meter.read_jsonl(os.path.join(run, "metrics.jsonl"))
    return rows, {k for row in rows for k in meter.scalars(row)}


def test_tensorboard_events_hold_every_metric_key(tiny_model, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = loop.fit(Config(model=tiny_model, out=str(tmp_path / "run"), report_to="tensorboard", method="memory-r+",
                          encoder="hashing", explore_warmup=1, **COMMON), quiet=True)
    rows, keys = numeric_keys(run)
    assert keys == {k for row in rows for k in row} - {"step"} and "memory/exploit" in keys  # every key is a number
    events = EventAccumulator(os.path.join(run, "tensorboard"), size_guidance={"scalars": 0}).Reload()
    assert set(events.Tags()["scalars"]) == keys
    for key in ("reward/total", "loss", "kl", "len/mean", "memory/explore"):
        logged = [(e.step, e.value) for e in events.Scalars(key)]
        assert logged == [(row["step"], pytest.approx(float(row[key]), rel=1e-6)) for row in rows]


def test_tensorboard_on_resume_drops_the_steps_run_again(tiny_model, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = str(tmp_path / "run")
    loop.fit(Config(model=tiny_model, out=out, report_to="tensorboard", **{**COMMON, "steps": 2}), quiet=True)
    loop.fit(Config(model=tiny_model, out=out, report_to="tensorboard", **{**COMMON, "steps": 4}), quiet=True,
             resume=True)
    events = EventAccumulator(os.path.join(out, "tensorboard"), size_guidance={"scalars": 0}).Reload()
    assert [e.step for e in events.Scalars("reward/total")] == [1, 2, 3, 4]


def test_wandb_offline_gets_every_metric_key(tiny_model, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = loop.fit(Config(model=tiny_model, out=str(tmp_path / "run"), report_to="wandb", **COMMON), quiet=True)
    rows, keys = numeric_keys(run)
    with open(os.path.join(run, "wandb-id")) as f:
        run_id = f.read().strip()
    [folder] = [d for d in os.listdir(os.path.join(run, "wandb")) if d.startswith("offline-run") and run_id in d]
    with open(os.path.join(run, "wandb", folder, f"run-{run_id}.wandb"), "rb") as f:
        records = f.read()  # wandb's own log of the run (protobuf records; the metric names are stored as text)
    missing = [k for k in keys if records.count(k.encode()) < len(rows)]  # one history record per step
    assert not missing and len(rows) == 3


def test_bad_or_missing_sink_is_one_line(tiny_model, tmp_path, monkeypatch):
    with pytest.raises(UserError, match="choose none, tensorboard, wandb"):
        config_mod.validate(Config(report_to="mlflow"))
    real = config_mod.importlib.util.find_spec
    monkeypatch.setattr(config_mod.importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))
    assert config_mod.missing_sinks("tensorboard,wandb") == ("report_to=tensorboard,wandb needs wandb: pip install "
                                                             "wandb, or drop --set report_to")
    monkeypatch.undo()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", "import sys, importlib.util as u; real = u.find_spec; "
                           "u.find_spec = lambda n, *a: None if n == 'tensorboard' else real(n, *a); "
                           "from tinyrl.cli import main; sys.argv = ['tinyrl', 'fit', 'arith', '--model', "
                           f"'{tiny_model}', '--out', '{tmp_path / 'r'}', '--set', 'report_to=tensorboard']; main()"],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1].startswith("tinyrl: error: report_to=tensorboard needs")
    assert len(done.stderr.strip().splitlines()) == 1 and not os.path.exists(tmp_path / "r")
