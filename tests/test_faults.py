"""Faults a long run meets, from the CLI as a user would hit them (tiny model, CPU, deterministic=true): SIGTERM and
SIGINT, a second fit on the same --out, a damaged checkpoint, a deadline, a full disk, --resume with changed
settings; and the OOM back-off's state surviving a resume."""

import dataclasses
import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tinyrl import checkpoint, grpo, loop
from tinyrl.config import Config
from tinyrl.errors import UserError

ARGS = ["--quiet", "--set", "group_size=4", "--set", "prompts_per_step=2", "--set", "max_new_tokens=10",
        "--set", "lr=1e-2", "--set", "save_every=2", "--set", "sample_every=2", "--set", "deterministic=true"]
ENV = {k: v for k, v in os.environ.items() if k not in ("MKL_CBWR", "CUBLAS_WORKSPACE_CONFIG")}
VOLATILE = ("time/", "mem/")


def command(model, out, steps=6, *extra):
    return [sys.executable, "-m", "tinyrl.cli", "fit", "toy", "--model", model, "--out", out, "--steps", str(steps),
            *ARGS, *extra]


def cli(cmd):
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)


def rows(run, name="metrics.jsonl"):
    path = os.path.join(run, name)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def outputs(run):
    strip = [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in rows(run)]
    return strip, rows(run, "samples.jsonl")


def one_line_error(done, *words):
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    message = done.stderr.strip().splitlines()[-1]  # (transformers' "Loading weights" bar may come before it)
    assert message.startswith("tinyrl: error: "), done.stderr
    for word in words:
        assert word in message, message
    return message


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory):
    run = str(tmp_path_factory.mktemp("ref") / "run")
    done = cli(command(tiny_model, run))
    assert done.returncode == 0, done.stderr[-2000:]
    return outputs(run)


def start(cmd, stderr_path):
    with open(stderr_path, "w") as err:
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=ENV)


def wait_for(predicate, proc, timeout=120):
    deadline = time.time() + timeout
    while not predicate() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert predicate(), "timed out" if proc.poll() is None else f"exited with {proc.returncode}"


def test_sigterm_checkpoints_at_the_step_boundary_and_the_rerun_matches(tiny_model, tmp_path, reference):
    run, log = str(tmp_path / "run"), str(tmp_path / "stderr")
    proc = start(command(tiny_model, run), log)
    wait_for(lambda: len(rows(run)) >= 1, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    done_steps = len(rows(run))
    assert 1 <= done_steps < 6
    assert checkpoint.latest_name(run) == f"step-{done_steps:06d}"  # the step it was in, checkpointed
    message = open(log).read()
    assert f"stopped at step {done_steps}/6 by SIGTERM" in message and "rerun the same command" in message
    done = cli(command(tiny_model, run))
    assert done.returncode == 0, done.stderr[-2000:]
    assert outputs(run) == reference


def test_a_second_sigint_stops_at_once_and_leaves_the_last_checkpoint(tiny_model, tmp_path):
    run, log = str(tmp_path / "run"), str(tmp_path / "stderr")
    slow = ["--set", "prompts_per_step=8", "--set", "group_size=16", "--set", "max_new_tokens=96",
            "--set", "min_new_tokens=96", "--set", "gen_batch=128",
            "--set", "save_every=1"]  # one generation batch of seconds: both signals land inside it
    proc = start(command(tiny_model, run, 50, *slow), log)
    wait_for(lambda: checkpoint.latest_name(run) == "step-000001", proc)
    proc.send_signal(signal.SIGINT)
    wait_for(lambda: "stopping at the next batch" in open(log).read(), proc)
    logged = len(rows(run))
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130
    text = open(log).read()
    assert "SIGINT again: stopping at once" in text and "rerun the same command to resume" in text, text
    assert len(rows(run)) == logged  # the step in progress was abandoned, not finished
    names = os.listdir(os.path.join(run, "checkpoints"))
    assert not [d for d in names if d.startswith(".tmp")] and checkpoint.latest_name(run) == f"step-{logged:06d}"
    done = cli(command(tiny_model, run, logged + 1, *slow, "--resume"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert [m["step"] for m in rows(run)] == list(range(1, logged + 2))


def test_a_second_fit_on_the_same_run_is_refused_and_a_killed_holders_lock_is_taken_over(tiny_model, tmp_path):
    run = str(tmp_path / "run")
    holder = start(command(tiny_model, run, 500), str(tmp_path / "stderr"))
    wait_for(lambda: len(rows(run)) >= 1, holder)
    one_line_error(cli(command(tiny_model, run, 500)), "in use by another tinyrl fit", f"pid {holder.pid}")
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    done_steps = max(checkpoint.steps(run), default=0)
    done = cli(command(tiny_model, run, 500) + ["--resume", "--steps", str(done_steps + 1)])
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(rows(run)) == done_steps + 1


def test_a_damaged_checkpoint_falls_back_to_the_one_before(tiny_model, tmp_path, reference):
    run = str(tmp_path / "run")
    extra = ["--set", "keep_checkpoints=0"]
    assert cli(command(tiny_model, run, 6, *extra)).returncode == 0
    adapter = os.path.join(run, "checkpoints", "step-000006", "adapter_model.safetensors")
    with open(adapter, "r+b") as f:  # cut in half, as a full disk or a killed copy leaves it
        f.truncate(os.path.getsize(adapter) // 2)
    done = cli(command(tiny_model, run, 6, *extra))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "warning: step-000006: unreadable" in done.stderr and "resuming from step-000004" in done.stderr
    assert outputs(run) == reference  # steps 5 and 6 ran again, exactly
    optimizer = os.path.join(run, "checkpoints", "step-000006", "optimizer.pt")
    with open(optimizer, "r+b") as f:  # one flipped byte: same size, found by the checksum
        f.seek(os.path.getsize(optimizer) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    for step in (2, 4):
        os.unlink(os.path.join(run, "checkpoints", f"step-{step:06d}", "rng.safetensors"))
    one_line_error(cli(command(tiny_model, run, 6, *extra)), "no usable checkpoint", "optimizer.pt",
                   "rng.safetensors")


def test_max_minutes_stops_with_a_checkpoint_before_the_deadline_and_the_rerun_goes_on(tiny_model, tmp_path):
    run = str(tmp_path / "run")
    cmd = command(tiny_model, run, 1000, "--set", "max_minutes=0.1", "--set", "save_every=1000")
    began = time.perf_counter()
    first = cli(cmd)  # --quiet: the stop is said anyway
    wall = time.perf_counter() - began
    assert first.returncode == 0, first.stderr[-2000:]
    done_steps = len(rows(run))
    assert 1 <= done_steps < 1000 and "by max_minutes=0.1" in first.stderr and "rerun the same command" in first.stderr
    assert checkpoint.latest_name(run) == f"step-{done_steps:06d}"
    assert wall < 6 + 60  # 6 s from fit's start, after Python, torch and the model load (a loose bound: timing)
    second = cli(cmd)
    assert second.returncode == 0, second.stderr[-2000:]
    assert len(rows(run)) > done_steps and rows(run)[done_steps]["step"] == done_steps + 1


def test_resume_may_change_steps_and_cadences_but_not_what_is_learned(tiny_model, tmp_path):
    run = str(tmp_path / "run")
    assert cli(command(tiny_model, run, 4)).returncode == 0
    one_line_error(cli(command(tiny_model, run, 6)), "other settings", "steps=4", "--resume")
    one_line_error(cli(command(tiny_model, run, 6, "--resume", "--set", "lr=0.5")), "lr=0.01", "cannot change")
    one_line_error(cli(command(tiny_model, run, 2, "--resume")), "step 4", "--steps 4 or more")
    done = cli(command(tiny_model, run, 6, "--resume", "--set", "save_every=1"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--resume: changed steps 4 -> 6 (the lr schedule follows), save_every 2 -> 1" in done.stderr
    metrics = rows(run)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    assert metrics[4]["lr"] == pytest.approx(grpo.lr_at(4, 6, 1e-2, 0.1))  # the schedule follows the new total
    assert metrics[4]["lr"] > 0 and checkpoint.latest_name(run) == "step-000006"


def fit_rows(cfg):
    run = loop.fit(cfg, quiet=True)
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in rows(run)], rows(run, "samples.jsonl")


def test_the_oom_back_off_survives_a_resume(tiny_model, tmp_path, monkeypatch):
    """One out-of-memory error in the first generation halves gen_batch 16 -> 8; a crash after the step-2
    checkpoint; the resumed run splits its batches as the uninterrupted one did and logs the same."""
    real_generate, real_take_step = loop.policy.generate, loop.take_step
    ooms = []

    def generate(*args, **kw):
        if not ooms:
            ooms.append(kw["gen_batch"])
            raise torch.OutOfMemoryError("simulated")
        return real_generate(*args, **kw)

    def crash_at_step_3(parts, cfg, train, step, log):
        if step == 2:
            raise RuntimeError("simulated crash")
        return real_take_step(parts, cfg, train, step, log)

    monkeypatch.setattr(loop.policy, "generate", generate)
    cfg = Config(task="toy", model=tiny_model, steps=4, prompts_per_step=4, group_size=4, max_new_tokens=8,
                 lr=1e-2, gen_batch=16, save_every=2, sample_every=1)
    reference = fit_rows(dataclasses.replace(cfg, out=str(tmp_path / "ref")))
    assert [m["oom/gen_batch"] for m in reference[0]] == [8] * 4 and reference[0][-1]["oom/backoffs"] == 1
    ooms.clear()
    run = dataclasses.replace(cfg, out=str(tmp_path / "run"))
    monkeypatch.setattr(loop, "take_step", crash_at_step_3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        loop.fit(run, quiet=True)
    monkeypatch.setattr(loop, "take_step", real_take_step)
    assert fit_rows(run) == reference


def test_a_full_disk_while_saving_is_one_line_and_the_run_resumes(tiny_model, tmp_path, monkeypatch):
    cfg = Config(task="toy", model=tiny_model, steps=4, prompts_per_step=2, group_size=4, max_new_tokens=8,
                 lr=1e-2, save_every=2)
    reference = fit_rows(dataclasses.replace(cfg, out=str(tmp_path / "ref")))
    real_save, saves = torch.save, []

    def full_disk(obj, path, *args, **kw):
        saves.append(path)
        if len(saves) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real_save(obj, path, *args, **kw)

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    run = dataclasses.replace(cfg, out=str(tmp_path / "run"))
    with pytest.raises(UserError, match="disk full while saving checkpoint step-000004") as err:
        loop.fit(run, quiet=True)
    assert "resume from step-000002" in str(err.value) and "\n" not in str(err.value)
    assert checkpoint.latest_name(run.out) == "step-000002"
    assert sorted(os.listdir(os.path.join(run.out, "checkpoints"))) == ["latest", "step-000002"]
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    assert fit_rows(run) == reference


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs, where this machine lets a test mount one (root in a sandbox); else skip."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4M", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield str(mount)
    subprocess.run(["umount", str(mount)], check=True)


def test_a_really_full_disk_while_saving_is_one_line_and_the_run_resumes(tiny_model, tmp_path, small_disk,
                                                                         monkeypatch):
    """torch.save and safetensors raise their own errors on ENOSPC, not OSError: found by the free space."""
    cfg = Config(task="toy", model=tiny_model, steps=4, prompts_per_step=2, group_size=4, max_new_tokens=8,
                 lr=1e-2, save_every=2)
    reference = fit_rows(dataclasses.replace(cfg, out=str(tmp_path / "ref")))
    real_take_step, filler = loop.take_step, os.path.join(small_disk, "filler")

    def fill_the_disk_after_the_first_checkpoint(parts, cfg, train, step, log):
        if step == 2:
            with open(filler, "wb") as f:  # leave 24 KiB: metrics lines fit, a ~120 KiB checkpoint does not
                f.write(b"\0" * (os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize - (24 << 10)))
        return real_take_step(parts, cfg, train, step, log)

    monkeypatch.setattr(loop, "take_step", fill_the_disk_after_the_first_checkpoint)
    run = dataclasses.replace(cfg, out=os.path.join(small_disk, "run"))
    with pytest.raises(UserError, match="disk full while saving checkpoint step-000004"):
        loop.fit(run, quiet=True)
    assert sorted(os.listdir(os.path.join(run.out, "checkpoints")))[:2] == ["latest", "step-000002"]
    assert checkpoint.latest_name(run.out) == "step-000002"
    os.unlink(filler)
    monkeypatch.setattr(loop, "take_step", real_take_step)
    assert fit_rows(run) == reference


def test_keep_checkpoints_keeps_the_newest_complete_ones(tiny_model, tmp_path):
    cfg = Config(task="toy", model=tiny_model, out=str(tmp_path / "run"), steps=5, prompts_per_step=2,
                 group_size=4, max_new_tokens=8, save_every=1, keep_checkpoints=2)
    loop.fit(cfg, quiet=True)
    assert sorted(os.listdir(os.path.join(cfg.out, "checkpoints"))) == ["latest", "step-000004", "step-000005"]


def test_prune_never_deletes_what_latest_names_and_drops_a_later_abandoned_future(tmp_path):
    run = str(tmp_path)
    for step in (1, 2, 3, 5):
        os.makedirs(os.path.join(run, "checkpoints", f"step-{step:06d}"))
    checkpoint.prune(run, 3, keep=2)  # step 3 just saved after resuming from 2; step 5 is an abandoned future
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["step-000002", "step-000003"]
    checkpoint.prune(run, 3, keep=1)
    assert os.listdir(os.path.join(run, "checkpoints")) == ["step-000003"]


def test_a_crash_before_latest_moves_keeps_the_checkpoint_it_names(tiny_model, tmp_path):
    run = str(tmp_path / "run")
    cmd = command(tiny_model, run, 6, "--set", "keep_checkpoints=1")
    crashed = subprocess.run(cmd, env={**ENV, "TINYRL_CRASH_AT": "before-latest:4"}, capture_output=True)
    assert crashed.returncode == -signal.SIGKILL
    assert checkpoint.latest_name(run) == "step-000002"  # still there: its successor never became latest
    assert os.path.isdir(os.path.join(run, "checkpoints", "step-000002"))
    assert cli(cmd).returncode == 0 and sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["latest",
                                                                                                  "step-000006"]


def test_the_cli_sets_the_deterministic_environment_before_torch_loads():
    probe = subprocess.run([sys.executable, "-c", "import sys, tinyrl.cli; print('torch' in sys.modules)"],
                           capture_output=True, text=True, env=ENV)
    assert probe.stdout.strip() == "False"  # so cli.fit can still set MKL_CBWR before `from tinyrl import loop`


def test_a_stop_request_lands_at_the_next_batch_and_the_rerun_matches(tiny_model, tmp_path, monkeypatch):
    """#27: a signal during step 3's generation stops after the batch in progress (not at the step's end): the
    step is dropped, a checkpoint of step 2 is written with the random state as it was when step 3 began, and the
    rerun gives the uninterrupted run's metrics and samples. In training (no memory) likewise, at a micro-batch."""
    from tinyrl import faults, loop
    from tinyrl.config import Config
    from tinyrl.errors import Stopped

    cfg = Config(task="toy", model=tiny_model, steps=4, prompts_per_step=2, group_size=4, max_new_tokens=10,
                 gen_batch=2, micro_batch=2, lr=1e-2, save_every=10, sample_every=1, deterministic=True)
    reference = loop.fit(dataclasses.replace(cfg, out=str(tmp_path / "ref")), quiet=True)
    real = faults.at_boundary
    for phase in ("generating", "training"):
        seen = []

        def at_boundary(stops, log, step, name, exact=True):
            inner = real(stops, log, step, name, exact)

            def at(done, total):
                seen.append((step, name, done))
                if step == 2 and name == phase and done == 2:  # the first batch of step 3's phase is done
                    stops.signal, stops.code = "SIGTERM", 143
                inner(done, total)

            return at

        monkeypatch.setattr(faults, "at_boundary", at_boundary)
        run = str(tmp_path / phase)
        with pytest.raises(Stopped, match="stopped at step 2/4 by SIGTERM; checkpoint step-000002 saved"):
            loop.fit(dataclasses.replace(cfg, out=run), quiet=True)
        assert seen[-1] == (2, phase, 2)  # no batch after the request
        assert len(rows(run)) == 2 and checkpoint.latest_name(run) == "step-000002"
        monkeypatch.setattr(faults, "at_boundary", real)
        loop.fit(dataclasses.replace(cfg, out=run), quiet=True)
        assert outputs(run) == outputs(reference)
