"""Checkpoints: adapter, optimizer, RNG, loop state (step, OOM back-off, loss scale) and memory, written
atomically; read back, falling back to an earlier one when the newest is damaged; pruned to the newest N.

Layout: RUN/checkpoints/step-000010/ and RUN/checkpoints/latest (a text file naming the newest complete one).
A checkpoint folder is built under a temp name and renamed into place, then `latest` is replaced: a crash at any
point leaves the previous checkpoint intact. state.json holds a manifest (size and CRC-32 of every file; the
memory checks its own), so a truncated or corrupt file is found before anything is restored. Nothing is
unpickled: tensors come back through safetensors or torch.load(weights_only=True), the rest is JSON.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import random
import shutil
import signal
import tempfile
import zlib

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tinyrl import config as config_mod
from tinyrl.config import Config
from tinyrl.errors import UserError

LATEST = "latest"
CRASH_ENV = "TINYRL_CRASH_AT"  # tests only: SIGKILL this process at a named point, e.g. "before-latest:4"


def check_run(cfg: Config, resume: bool, total: int) -> tuple[list[str], int]:
    """Whether cfg may start or continue the run in cfg.out, read before any weight loads; returns (settings
    --resume changed, the step of the checkpoint to resume from, 0 if none).

    A folder whose saved config equals cfg is resumed (rerunning the same command continues it); with --resume,
    config.RESUMABLE settings may differ (the lr schedule follows the new total); any other difference is an
    error, so no run is overwritten by accident.
    """
    run, changes = cfg.out, []
    saved_path = os.path.join(run, "config.json")
    if os.path.exists(saved_path):
        saved = config_mod.load(saved_path)
        if saved != cfg and not resume:
            names = [k for k in config_mod.FIELDS if getattr(saved, k) != getattr(cfg, k)]
            diff = ", ".join(f"{k}={getattr(saved, k)!r}" for k in names)
            fixed = [k for k in names if k not in config_mod.RESUMABLE]
            if fixed:  # --resume cannot help: say so rather than suggest it
                raise UserError(f"{run} holds a run with other settings ({diff}); rerun it with those, or choose "
                                f"another --out ({', '.join(fixed)} cannot change in a run, even with --resume)")
            raise UserError(f"{run} holds a run with other settings ({diff}); rerun it with those, pass --resume "
                            "to continue it with yours (steps, cadences and deadline may change), or choose "
                            "another --out")
        changes = config_mod.resume_changes(saved, cfg, run)
    named = latest_name(run)  # the step resumed from, unless that checkpoint turns out damaged
    if named and not os.path.exists(saved_path):
        raise UserError(f"{run} has checkpoints but no config.json; choose another --out")
    done = int(named[5:]) if named and named[5:].isdigit() else max(steps(run), default=0)
    if total < done:
        raise UserError(f"{run} has a checkpoint at step {done}, past --steps {total}; pass --steps {done} or more")
    return changes, done


def prepare_run(cfg: Config, resume: bool, total: int) -> str:
    """Checked again (`check_run`, now under the run's lock), save the config; a run that died before its first
    checkpoint loses its metrics and samples, which the new start writes again. Returns the run folder."""
    _, done = check_run(cfg, resume, total)
    config_mod.save(cfg, os.path.join(cfg.out, "config.json"))
    if not done:
        for name in ("metrics.jsonl", "samples.jsonl"):
            if os.path.exists(os.path.join(cfg.out, name)):
                os.unlink(os.path.join(cfg.out, name))
    return cfg.out


def check_writable(run: str) -> None:
    """Fail before any work when the run folder cannot be written (the folder itself is created later)."""
    parent = os.path.dirname(os.path.abspath(run))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    target = run if os.path.exists(run) else parent
    if not os.path.isdir(target) or not os.access(target, os.W_OK | os.X_OK):
        raise UserError(f"--out {run}: cannot write there; choose another folder")


def _crash_point(name: str) -> None:
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def folder(run: str) -> str:
    return os.path.join(run, "checkpoints")


def latest(run: str) -> str | None:
    """Path of the newest complete checkpoint, or None."""
    pointer = os.path.join(folder(run), LATEST)
    if not os.path.exists(pointer):
        return None
    with open(pointer) as f:
        name = f.read().strip()
    path = os.path.join(folder(run), name)
    if not os.path.exists(os.path.join(path, "state.json")):
        raise UserError(f"{pointer} names {name}, which is missing or incomplete; delete {pointer} to start over")
    return path


def rng_state() -> dict[str, torch.Tensor]:
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            states[f"cuda{i}"] = s
    return states


def set_rng_state(states: dict[str, torch.Tensor], python_state: list) -> None:
    torch.set_rng_state(states["torch"])
    for key, s in states.items():
        if key.startswith("cuda") and torch.cuda.is_available() and int(key[4:]) < torch.cuda.device_count():
            torch.cuda.set_rng_state(s, int(key[4:]))
    version, internal, gauss = python_state
    random.setstate((version, tuple(internal), gauss))


def save(run: str, step: int, model, optimizer, state: dict, memory=None, keep: int = 0) -> str:
    """Write checkpoint `step` atomically, point `latest` at it, then keep the newest `keep` (0: all). Returns its
    folder. A full disk is one UserError; the previous checkpoint stays as it was."""
    root = folder(run)
    os.makedirs(root, exist_ok=True)
    for stale in os.listdir(root):  # temp folders of a save that was killed
        if stale.startswith(".tmp-"):
            shutil.rmtree(os.path.join(root, stale), ignore_errors=True)
    name = f"step-{step:06d}"
    try:
        final = _write(root, name, step, model, optimizer, state, memory)
        _crash_point(f"before-latest:{step}")
        pointer_tmp = os.path.join(root, f".{LATEST}.tmp")
        with open(pointer_tmp, "w") as f:
            f.write(name + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(pointer_tmp, os.path.join(root, LATEST))
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        previous = latest_name(run)
        raise UserError(f"disk full while saving checkpoint {name} in {root}; free some space (e.g. older "
                        f"checkpoints there) and rerun the same command to resume from {previous or 'the start'}"
                        ) from None
    prune(run, step, keep)
    return final


def _write(root: str, name: str, step: int, model, optimizer, state: dict, memory) -> str:
    """Build the checkpoint in a temp folder, with a manifest of its files' sizes and CRC-32, and rename it in."""
    tmp = tempfile.mkdtemp(dir=root, prefix=f".tmp-{name}-")
    try:
        model.save_pretrained(tmp)  # adapter_config.json + adapter_model.safetensors
        torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
        save_file({k: v.contiguous() for k, v in rng_state().items()}, os.path.join(tmp, "rng.safetensors"))
        if memory is not None:
            memory.save(os.path.join(tmp, "memory"))  # it checks its own files
        files = {f: _file_info(os.path.join(tmp, f)) for f in sorted(os.listdir(tmp))
                 if os.path.isfile(os.path.join(tmp, f))}
        full = {"step": step, "python_rng": list(random.getstate()), "files": files, **state}
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump(full, f)
        _fsync_tree(tmp)
        _crash_point(f"before-rename:{step}")
        final = os.path.join(root, name)
        if os.path.exists(final):  # re-saving a step after a resume: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException as err:
        full = _out_of_space(err, root)  # judged before the partial files are removed
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise OSError(errno.ENOSPC, f"no space left on device ({type(err).__name__})") from err
        raise
    return final


def _out_of_space(err: BaseException, root: str) -> bool:
    """Whether a failed write ran out of disk: an ENOSPC/EDQUOT OSError, or a library's own error (torch.save
    says 'unexpected pos', safetensors 'I/O error') while the disk is all but full."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if not isinstance(err, Exception):
        return False
    try:
        return "No space left" in str(err) or shutil.disk_usage(root).free < 1 << 20
    except OSError:
        return False


def prune(run: str, step: int, keep: int) -> None:
    """After checkpoint `step` is complete and named by `latest`: delete checkpoints of later steps (left by a run
    that resumed from an earlier one) and, with keep > 0, all but the newest `keep` up to `step`."""
    present = sorted(steps(run))
    older = [s for s in present if s <= step]
    doomed = [s for s in present if s > step] + (older[:-keep] if keep else [])
    for s in doomed:
        shutil.rmtree(os.path.join(folder(run), f"step-{s:06d}"), ignore_errors=True)


def steps(run: str) -> list[int]:
    """Steps of the checkpoint folders present (complete or not)."""
    if not os.path.isdir(folder(run)):
        return []
    return [int(d[5:]) for d in os.listdir(folder(run)) if d.startswith("step-") and d[5:].isdigit()]


def latest_name(run: str) -> str | None:
    """The checkpoint `latest` names, or None."""
    try:
        with open(os.path.join(folder(run), LATEST)) as f:
            return f.read().strip() or None
    except OSError:
        return None


def resume(run: str, model, optimizer, memory=None, warn=print) -> dict | None:
    """Restore the newest usable checkpoint of `run` into the live objects; its state (step, ...) or None when the
    run has no checkpoint. The one `latest` names comes first; if it is missing, truncated or corrupt, the next
    newest is tried, with a one-line warning; UserError if none can be read."""
    names = [f"step-{s:06d}" for s in sorted(steps(run), reverse=True)]
    pointed = latest_name(run)
    if pointed in names:
        names.remove(pointed)
    if pointed:
        names.insert(0, pointed)
    problems = []
    for name in names:
        try:
            state = load(os.path.join(folder(run), name), model, optimizer, memory)
        except UserError as err:
            problems.append(f"{name}: {err}")
            continue
        if problems:
            warn(f"warning: {'; '.join(problems)}; resuming from {name}")
        return state
    if problems:
        raise UserError(f"{run}: no usable checkpoint ({'; '.join(problems)}); delete {folder(run)} to start over, "
                        "or choose another --out")
    return None


def restore(state: dict | None, cfg: Config, scaler) -> tuple[int, Config, int]:
    """After `resume`: the step to continue from, the config as the OOM back-off had left it (so the batches
    split as they would have) and its count of back-offs; the loss scale put back. (0, cfg, 0) for a fresh run."""
    if state is None:
        return 0, cfg, 0
    if scaler and "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    knobs = {k: v for k, v in state.get("oom", {}).items() if k != "backoffs"}
    return state["step"], dataclasses.replace(cfg, **knobs), state.get("oom", {}).get("backoffs", 0)


def load(path: str, model, optimizer, memory=None) -> dict:
    """Restore everything `save` wrote into the live objects; returns the JSON state (step, data position...).
    Every file is checked (sizes and CRC-32 against the manifest, then parsed) before anything is applied."""
    from peft import set_peft_model_state_dict

    try:
        with open(os.path.join(path, "state.json")) as f:
            state = json.load(f)
        for name, info in state.get("files", {}).items():
            if _file_info(os.path.join(path, name)) != info:
                raise ValueError(f"{name} does not match its size and checksum")
        weights = load_file(os.path.join(path, "adapter_model.safetensors"))
        optim = torch.load(os.path.join(path, "optimizer.pt"), weights_only=True)
        rng = load_file(os.path.join(path, "rng.safetensors"))
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as err:
        if isinstance(err, OSError) and err.filename:
            reason = f"{os.path.basename(err.filename)}: {err.strerror}"
        else:
            reason = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
        raise UserError(f"unreadable ({reason})") from None
    if memory is not None:
        memory.load(os.path.join(path, "memory"))  # UserError if damaged; nothing changed then
    result = set_peft_model_state_dict(model, weights)
    if getattr(result, "unexpected_keys", None):
        raise UserError(f"checkpoint {path} does not match this model (unexpected {result.unexpected_keys[:2]})")
    optimizer.load_state_dict(with_kernels_of(optimizer, optim))
    set_rng_state(rng, state["python_rng"])
    return state


KERNEL_FLAGS = ("fused", "foreach", "capturable", "differentiable")  # how this process steps, not training state


def with_kernels_of(optimizer, saved: dict) -> dict:
    """`saved` (an optimizer state dict) with each group's kernel flags taken from the live `optimizer`.
    load_state_dict would otherwise put the saved ones back: a run begun on CPU, or before tinyrl used fused AdamW,
    would step unfused on CUDA, and with fp16 fail (the optimizer still tells GradScaler that it takes `found_inf`).
    Set before loading, the flags also place each `step` where the fused kernel wants it."""
    groups = [{**group, **{k: live[k] for k in KERNEL_FLAGS if k in live}}
              for group, live in zip(saved["param_groups"], optimizer.param_groups)]
    return {**saved, "param_groups": groups}


def _file_info(path: str) -> list[int]:
    """[size, CRC-32] of a file."""
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            crc = zlib.crc32(block, crc)
    return [os.path.getsize(path), crc]


def _fsync_tree(path: str) -> None:
    for base, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(base, name), "rb") as f:
                os.fsync(f.fileno())
