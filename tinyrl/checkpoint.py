"""Checkpoints: adapter, optimizer, scheduler, RNG, data position and memory, written atomically; and read back.

Layout: RUN/checkpoints/step-000010/ and RUN/checkpoints/latest (a text file naming the newest complete one).
A checkpoint folder is built under a temp name and renamed into place, then `latest` is replaced: a crash at any
point leaves the previous checkpoint intact. Nothing is unpickled: tensors come back through safetensors or
torch.load(weights_only=True), the rest is JSON.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import tempfile

import torch
from safetensors.torch import load_file, save_file

from tinyrl.errors import UserError

LATEST = "latest"
CRASH_ENV = "TINYRL_CRASH_AT"  # tests only: SIGKILL this process at a named point, e.g. "before-latest:4"


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


def save(run: str, step: int, model, optimizer, scheduler, state: dict, memory=None) -> str:
    """Write checkpoint `step` atomically and point `latest` at it. Returns its folder."""
    root = folder(run)
    os.makedirs(root, exist_ok=True)
    for stale in os.listdir(root):  # temp folders of a save that was killed
        if stale.startswith(".tmp-"):
            shutil.rmtree(os.path.join(root, stale), ignore_errors=True)
    name = f"step-{step:06d}"
    tmp = tempfile.mkdtemp(dir=root, prefix=f".tmp-{name}-")
    try:
        model.save_pretrained(tmp)  # adapter_config.json + adapter_model.safetensors
        torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
        save_file({k: v.contiguous() for k, v in rng_state().items()}, os.path.join(tmp, "rng.safetensors"))
        if memory is not None:
            memory.save(os.path.join(tmp, "memory"))
        full = {"step": step, "scheduler": scheduler.state_dict(), "python_rng": list(random.getstate()), **state}
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump(full, f)
        _fsync_tree(tmp)
        _crash_point(f"before-rename:{step}")
        final = os.path.join(root, name)
        if os.path.exists(final):  # re-saving a step after a resume: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _crash_point(f"before-latest:{step}")
    pointer_tmp = os.path.join(root, f".{LATEST}.tmp")
    with open(pointer_tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(pointer_tmp, os.path.join(root, LATEST))
    return final


def load(path: str, model, optimizer, scheduler, memory=None) -> dict:
    """Restore everything `save` wrote into the live objects; returns the JSON state (step, data position...)."""
    from peft import set_peft_model_state_dict

    try:
        with open(os.path.join(path, "state.json")) as f:
            state = json.load(f)
        weights = load_file(os.path.join(path, "adapter_model.safetensors"))
        optim = torch.load(os.path.join(path, "optimizer.pt"), weights_only=True)
        rng = load_file(os.path.join(path, "rng.safetensors"))
    except (OSError, ValueError, RuntimeError, json.JSONDecodeError) as err:
        raise UserError(f"checkpoint {path} is unreadable ({type(err).__name__}); remove it and its "
                        "'latest' entry to resume from an earlier one") from None
    result = set_peft_model_state_dict(model, weights)
    if getattr(result, "unexpected_keys", None):
        raise UserError(f"checkpoint {path} does not match this model (unexpected {result.unexpected_keys[:2]})")
    optimizer.load_state_dict(optim)
    scheduler.load_state_dict(state["scheduler"])
    if memory is not None:
        memory.load(os.path.join(path, "memory"))
    set_rng_state(rng, state["python_rng"])
    return state


def _fsync_tree(path: str) -> None:
    for base, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(base, name), "rb") as f:
                os.fsync(f.fileno())
