"""Faults a long run on a borrowed machine meets, as small pieces the loop uses: a lock on the run folder, stop
requests from signals, a deadline judged from measured step times, deterministic mode, the non-finite stop.

- `RunLock`: two `fit` processes on one --out would interleave their checkpoints; the second is refused.
- `StopRequests`: SIGTERM or SIGINT (a notebook's stop button, the end of a session) asks the loop to stop at the
  next generation batch or micro-batch (`at_boundary`: the step is dropped, `Abandoned`) with a checkpoint; a
  second one stops at once.
- `with_oom_backoff`: an out-of-memory error halves gen_batch or micro_batch and redoes the same work.
- `past_deadline`: whether the next step (and a checkpoint) would end after `max_minutes`.
- `deterministic`: torch's deterministic algorithms while fit runs (deterministic=true).
- `nonfinite_message`: why fit stops after `max_skipped_steps` non-finite steps in a row.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import sys
import threading
import time

import torch

from tinyrl.config import DETERMINISTIC_ENV
from tinyrl.errors import UserError

LOCK_FILE = ".lock"


class RunLock:
    """An exclusive lock on a run folder: `flock` on RUN/.lock, which the kernel drops when its holder ends in any
    way (kill -9 included), so a lock left by a dead process is simply taken over. The holder writes its pid, host
    and start time into the file, for the message the next one gets. Where the file system has no flock (some
    network mounts), runs go unlocked."""

    def __init__(self, run: str):
        self.run, self.path, self.fd = run, os.path.join(run, LOCK_FILE), None

    def acquire(self) -> None:
        if self.fd is not None:
            return
        try:
            import fcntl
        except ImportError:  # not a POSIX system
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "a process"
            os.close(fd)
            raise UserError(f"{self.run} is in use by another tinyrl fit ({holder}); wait for it to end or stop "
                            "it, or choose another --out") from None
        except OSError:  # no flock on this file system
            os.close(fd)
            return
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                  .encode(), 0)
        self.fd = fd

    def __enter__(self) -> RunLock:
        if os.path.isdir(self.run):  # refuse a second fit before it spends minutes loading a model
            self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # drops the flock; the file stays (removing it would race a process opening it)
            self.fd = None


class Abandoned(Exception):
    """A stop request reached a batch boundary inside a step: the step is dropped, and the run checkpoints as it
    was when the step began (the loop puts the random state back)."""


class StopRequests:
    """While active, the first SIGINT or SIGTERM sets `signal` (its name) and `code` for the loop to act on at
    the next boundary: a generation batch, a training micro-batch where that is exact (`boundary`), or the step's
    end; a second raises KeyboardInterrupt at once, which unwinds through the atomic writes
    (a checkpoint being written is removed, never half-kept). The previous handlers come back on exit.
    Handlers can only be set in the main thread; elsewhere signals keep their usual effect."""

    def __init__(self):
        self.signal: str | None = None
        self.code = 0
        self.previous: dict = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signal is not None:
            _say(f"tinyrl: {name} again: stopping at once; the last checkpoint stays\n")
            raise KeyboardInterrupt
        self.signal, self.code = name, 128 + signum
        _say(f"tinyrl: {name}: stopping at the next batch with a checkpoint (send it again to stop at once)\n")

    def boundary(self, exact: bool = True) -> None:
        """Raise Abandoned when a stop was asked for and dropping the step here loses nothing (`exact`: nothing
        the step changed outlives it but the random state, which the loop restores)."""
        if self.signal is not None and exact:
            raise Abandoned(self.signal)


def at_boundary(stops: StopRequests | None, log, step: int, phase: str, exact: bool = True):
    """The callback for after each generation batch or training micro-batch of step `step` (0-based): progress on
    the meter `log` (`within`), then a stop request lands there when dropping the step loses nothing (`exact`)."""
    def at(done: int, total: int) -> None:
        log.within(step + 1, phase, done, total)
        if stops is not None:
            stops.boundary(exact)

    return at


def _say(text: str) -> None:
    """Write from a signal handler: os.write, not print, which may be in the middle of writing already."""
    try:
        os.write(sys.stderr.fileno(), text.encode())
    except (OSError, ValueError):
        pass


def past_deadline(elapsed_s: float, step_times: list[float], save_s: float, limit_s: float,
                  margin: float = 1.2) -> bool:
    """Whether one more step, then a checkpoint, would end after `limit_s` (0: no limit). The next step is taken to
    last as long as the slowest of the last three (evaluation steps included), times `margin`. Before any step is
    measured there is nothing to judge by: False.

    60 s used of 100, steps of 20 and 30 s, a 5 s save: 60 + 36 + 5 > 100, stop.
    >>> past_deadline(60, [20, 30], 5, 100), past_deadline(50, [20, 30], 5, 100), past_deadline(99, [], 5, 100)
    (True, False, False)
    """
    if not limit_s or not step_times:
        return False
    return elapsed_s + margin * max(step_times[-3:]) + save_s > limit_s


@contextlib.contextmanager
def deterministic(on: bool):
    """deterministic=true: torch's deterministic algorithms (warning, not failing, on ops that have none) while fit
    runs. The environment half (MKL_CBWR, CUBLAS_WORKSPACE_CONFIG) must be set before torch loads: the CLI does it."""
    if not on:
        yield
        return
    missing = [k for k, v in DETERMINISTIC_ENV.items() if os.environ.get(k) != v]
    if missing:
        print(f"note: deterministic=true wants {', '.join(missing)} set before torch is imported (the CLI does it); "
              "without it CPU runs may still differ in the last bits", flush=True)
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def nonfinite_message(skipped: int, metrics: dict, lr: float, dtype: torch.dtype, kept: str | None) -> str:
    """The one line fit stops with after `skipped` steps in a row with a non-finite loss or gradient norm."""
    name = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}.get(dtype, str(dtype))
    cause = ("fp16 overflowing despite loss scaling (use --set dtype=bf16 where the GPU has it, else fp32), or "
             if dtype == torch.float16 else "") + f"lr {lr:g} too high (compute dtype {name})"
    return (f"{skipped} steps in a row had a non-finite loss or gradient (last: loss {metrics['loss']}, grad_norm "
            f"{metrics['grad_norm']}) and were skipped; likely causes: {cause}. The last checkpoint "
            f"({kept or 'none yet'}) is kept; start a new --out with other settings")


def with_oom_backoff(run, cfg, knob: str, log):
    """Run `run(cfg)`; on out-of-memory halve `knob` (gen_batch or micro_batch) and run the same work again.

    Nothing is lost: a training retry (`accumulate`) starts from zeroed gradients and comes before the update, and
    the rollouts of the step are kept. The smaller value stays for the rest of the run. Returns (result, cfg).
    """
    while True:
        try:
            return run(cfg), cfg
        except torch.OutOfMemoryError:
            value = getattr(cfg, knob)
            hint = allocator_hint()
            if value == 1:
                raise UserError(f"out of memory with {knob}=1; lower max_new_tokens or lora_rank, use quant=4bit, or "
                                f"plan with a smaller --vram{hint} (docs/memory.md: what to try on OOM)")
            smaller = dataclasses.replace(cfg, **{knob: value // 2})
            if knob == "micro_batch":
                smaller = dataclasses.replace(smaller, logprob_chunk=min(cfg.logprob_chunk, value // 2))
            log.echo(f"warning: out of memory; {knob} {value} -> {value // 2}, retrying the step{hint}")
            log.oom_backoffs += 1
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            cfg = smaller


def allocator_hint() -> str:
    """For an out-of-memory message on CUDA when torch's allocator has its default settings: the one setting that
    most often avoids fragmentation (Falcon3-1B at 16 GiB on an H100: 16.0 -> 13.1 GiB on the card, docs/memory.md)."""
    configured = os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or os.environ.get("PYTORCH_ALLOC_CONF")
    if configured or not torch.cuda.is_available():
        return ""
    return "; setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True before the run often avoids this"
