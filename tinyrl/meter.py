"""Meter: per-step metrics to metrics.jsonl and one grep-able line, a progress bar, samples, collapse warnings."""

from __future__ import annotations

import ctypes
import functools
import json
import os
import sys
import time
import uuid
from contextlib import contextmanager

import torch

from tinyrl import config as config_mod
from tinyrl.errors import UserError
from tinyrl.types import Rollouts, Scored, StepResult

# --- peak memory per phase ----------------------------------------------------------------------


def reset_peak(device: torch.device) -> None:
    """Start a phase: reset CUDA's peak counter, or on Linux hand freed heap pages back (`release_freed`) and
    reset the process' peak RSS (VmHWM) via clear_refs, so a phase's peak is its own, not its predecessor's
    leftovers."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    release_freed()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def release_freed() -> bool:
    """glibc keeps freed heap pages resident; malloc_trim(0) returns them to the OS. False where there is no
    glibc (macOS, musl): nothing to do there."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


@functools.lru_cache(maxsize=None)
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError, TypeError):  # musl has no malloc_trim
        return None


def peak_bytes(device: torch.device) -> int:
    """Peak since reset_peak: CUDA allocated bytes on GPU, peak RSS on CPU (0 where unknown)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@contextmanager
def phase(timings: dict, peaks: dict, name: str, device: torch.device):
    """Time a phase and record its peak memory under `name`."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    reset_peak(device)
    start = time.perf_counter()
    yield
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    timings[name] = timings.get(name, 0.0) + time.perf_counter() - start
    peaks[name] = max(peaks.get(name, 0), peak_bytes(device))
    if device.type == "cuda":  # what the caching allocator held: allocated + its cached blocks
        peaks["reserved"] = max(peaks.get("reserved", 0), int(torch.cuda.max_memory_reserved(device)))


def cuda_outside_torch(device: torch.device) -> int:
    """Device bytes in use that torch's allocator does not hold: the CUDA context and the kernels loaded so far
    (it grows during the first step), and any other process on the card. Measured as total - free - reserved."""
    free, total = torch.cuda.mem_get_info(device)
    return max(0, total - free - int(torch.cuda.memory_reserved(device)))


def cap_cuda_memory(vram_bytes: int, context: int, device, quiet: bool = False) -> None:
    """Cap torch's allocator so that it plus what lives outside it (the CUDA context) stays within vram_bytes:
    on a bigger card the run then backs off or fails where the smaller card would. Near the cap the allocator
    returns cached blocks to the driver before it fails, which costs speed, not correctness. Says so when more
    than the context is in use outside torch already (other processes): the budget is this run's alone."""
    index = torch.cuda.current_device() if device.index is None else device.index  # torch wants an index here
    total = torch.cuda.get_device_properties(index).total_memory
    torch.cuda.set_per_process_memory_fraction(max(0.0, min(1.0, (vram_bytes - context) / total)), index)
    outside = cuda_outside_torch(device)
    if outside > context and not quiet:
        print(f"note: {human_bytes(outside)} of this GPU is in use outside torch (other processes?); the memory "
              "budget covers this run only", flush=True)


# --- collapse indicators ------------------------------------------------------------------------

FORMAT_KEYS = ("reward/xml_count", "reward/soft_format", "reward/strict_format")
FORMAT_MAX = 1.5


def collapse_warnings(history: list[dict], window: int = 5) -> list[str]:
    """Warnings the last `window` steps trip; empty while fewer steps exist.

    >>> collapse_warnings([{"len/frac_at_cap": 1.0}] * 5)
    ['length pinned at the cap: >90% of completions hit max_new_tokens for 5 steps (raise max_new_tokens or expect collapse)']
    """
    if len(history) < window:
        return []
    recent = history[-window:]

    def mean(key):
        values = [m[key] for m in recent if key in m]
        return sum(values) / len(values) if values else None

    out = []
    at_cap, short = mean("len/frac_at_cap"), mean("len/frac_short")
    if at_cap is not None and at_cap > 0.9:
        out.append(f"length pinned at the cap: >90% of completions hit max_new_tokens for {window} steps "
                   "(raise max_new_tokens or expect collapse)")
    if short is not None and short > 0.5:
        out.append(f"short completions: most completions are under 16 tokens for {window} steps (length collapse)")
    fmt = [mean(k) for k in FORMAT_KEYS]
    if all(v is not None for v in fmt) and len(history) >= 2 * window:
        early = [m.get("correct", 0.0) for m in history[-2 * window:-window]]
        if sum(fmt) > 0.9 * FORMAT_MAX and mean("correct") <= sum(early) / window:
            out.append("format reward saturated while correctness is flat: the policy is farming format rewards")
    zero_var = mean("groups/frac_zero_var")
    if zero_var is not None and zero_var >= 1.0:
        out.append(f"every group had identical rewards for {window} steps: advantages are 0, nothing is learned "
                   "(try a longer max_new_tokens, few_shot=1, or a memory method)")
    return out


def step_metrics(step: int, rollouts: Rollouts, scored: Scored, result: StepResult, *, lr: float,
                 timings: dict, peaks: dict) -> dict:
    """Every key is defined in docs/metrics.md."""
    lengths = rollouts.completion_mask.sum(-1)  # [P*G] tokens incl. EOS
    grouped = scored.total.view(-1, rollouts.group_size)  # [P, G]
    metrics = {"step": step, "reward/total": scored.total.mean().item()}
    metrics.update({f"reward/{k}": v.nanmean().item() for k, v in scored.components.items()  # None: no opinion
                    if not v.isnan().all()})
    metrics.update({
        "correct": scored.correct.float().mean().item(),
        "len/mean": lengths.mean().item(), "len/min": lengths.min().item(), "len/max": lengths.max().item(),
        "len/frac_at_cap": rollouts.truncated.float().mean().item(),
        "len/frac_short": (lengths < 16).float().mean().item(),
        "groups/frac_zero_var": (grouped.std(-1) < 1e-6).float().mean().item(),
        "loss": result.loss, "kl": result.kl, "grad_norm": result.grad_norm, "lr": lr,
        "amp/skipped": float(result.skipped), "amp/scale": result.scale,
    })
    metrics.update({f"time/{k}": round(v, 4) for k, v in timings.items()})
    metrics.update({f"mem/{k}": v for k, v in peaks.items()})
    return metrics


def sample_rows(rollouts: Rollouts, scored: Scored, n: int) -> list[dict]:
    rows = []
    for i in range(min(n, len(rollouts.completions))):
        ex = rollouts.prompts.examples[i // rollouts.group_size]
        rows.append({"question": ex.question, "answer": ex.answer, "completion": rollouts.completions[i],
                     "reward": round(scored.total[i].item(), 4),
                     **{k: None if v[i].isnan() else round(v[i].item(), 4) for k, v in scored.components.items()}})
    return rows


# --- the meter ----------------------------------------------------------------------------------


def human_bytes(n: float) -> str:
    for unit in ("B", "K", "M", "G"):
        if abs(n) < 1024 or unit == "G":
            return f"{n:.1f}{unit}" if unit != "B" else f"{int(n)}B"
        n /= 1024
    return f"{n:.1f}G"


def step_line(m: dict, total: int) -> str:
    """The one grep-able line per step."""
    return (f"step {m['step']}/{total} reward {m['reward/total']:.3f} correct {m['correct']:.3f} "
            f"len {m['len/mean']:.1f} kl {m['kl']:.4f} gnorm {m['grad_norm']:.4f} lr {m['lr']:.2e} "
            f"time {m['time/step']:.1f}s (gen {m['time/generate']:.1f} score {m['time/score']:.1f} "
            f"train {m['time/train']:.1f}) peak gen {human_bytes(m['mem/generate'])} "
            f"train {human_bytes(m['mem/train'])}")


WITHIN_EVERY = 30.0  # seconds between two progress lines inside a step, off a terminal


class Meter:
    """Writes metrics.jsonl / samples.jsonl in the run folder and shows progress (a bar on a terminal)."""

    def __init__(self, out: str, total: int, start: int, quiet: bool = False, oom_backoffs: int = 0,
                 cfg=None):
        self.out, self.total = out, total
        self.live = live_sinks(cfg, out, start) if cfg is not None else []  # report_to
        for name in ("metrics.jsonl", "samples.jsonl"):  # on resume: the steps after the checkpoint run again
            truncate_jsonl(os.path.join(out, name), start)
        self.history: list[dict] = read_jsonl(os.path.join(out, "metrics.jsonl"))
        self.warned: set[str] = set()
        self.oom_backoffs = oom_backoffs  # times an out-of-memory error halved gen_batch or micro_batch in this run
        self.pending_samples: list[dict] = []  # the last step's sample rows, written when it is a sampling step
        self.quiet = quiet
        self.last_within = time.monotonic()  # the last progress line inside a step (`within`)
        self.progress = None
        if sys.stderr.isatty() and not quiet:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("[bold]fit"), BarColumn(), MofNCompleteColumn(),
                                     TimeRemainingColumn(), TextColumn("{task.fields[stats]}"), transient=True)
            self.task = self.progress.add_task("fit", total=total, completed=start, stats="generating...")
            self.progress.start()

    def log(self, metrics: dict) -> None:
        _append_jsonl(os.path.join(self.out, "metrics.jsonl"), metrics)
        for sink in self.live:
            sink.log(metrics)
        self.history.append(metrics)
        line = step_line(metrics, self.total)
        self.echo(line)
        if self.progress:
            self.progress.update(self.task, completed=metrics["step"],
                                 stats=f"reward {metrics['reward/total']:.3f} len {metrics['len/mean']:.0f} "
                                       f"kl {metrics['kl']:.4f}")
        for warning in collapse_warnings(self.history):
            if warning not in self.warned:
                self.warned.add(warning)
                self.echo(f"warning: {warning}")

    def samples(self, step: int, rows: list[dict]) -> None:
        for row in rows:
            _append_jsonl(os.path.join(self.out, "samples.jsonl"), {"step": step, **row})

    def within(self, step: int, phase: str, done: int, total: int) -> None:
        """Progress inside step `step` (1-based): `done` of `total` sequences through `phase`. On a terminal the
        bar says it; elsewhere (a log, a notebook) a line at most every WITHIN_EVERY seconds, so a long CPU step
        is not silent for minutes and a fast one adds nothing."""
        text = f"step {step}/{self.total}: {phase} {done}/{total}"
        if self.progress:
            self.progress.update(self.task, stats=text)
        elif not self.quiet and time.monotonic() - self.last_within >= WITHIN_EVERY and done < total:
            self.last_within = time.monotonic()
            print(f"  {text}", flush=True)

    def echo(self, line: str) -> None:
        if self.quiet:
            return
        if self.progress:
            self.progress.console.print(line, highlight=False)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.progress:
            self.progress.stop()
        for sink in self.live:
            sink.close()


# --- live metrics (report_to) -----------------------------------------------------------------------


def scalars(metrics: dict) -> dict[str, float]:
    """The numeric metrics of a step (every metrics.jsonl key but `step`), as floats.

    >>> scalars({"step": 3, "reward/total": 1, "amp/skipped": False, "note": "x"})
    {'reward/total': 1.0, 'amp/skipped': 0.0}
    """
    return {k: float(v) for k, v in metrics.items()
            if k != "step" and isinstance(v, (int, float, bool)) and not isinstance(v, str)}


class TensorBoardSink:
    """Every metrics.jsonl key as a TensorBoard scalar in RUN/tensorboard (torch's SummaryWriter). On resume the
    events after the checkpoint's step are dropped, as in metrics.jsonl."""

    def __init__(self, run: str, start: int):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(os.path.join(run, "tensorboard"), purge_step=start + 1)

    def log(self, metrics: dict) -> None:
        for key, value in scalars(metrics).items():
            self.writer.add_scalar(key, value, metrics["step"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """Every metrics.jsonl key to Weights & Biases; one wandb run per run folder (its id kept in RUN/wandb-id), so a
    resumed fit continues it. WANDB_MODE=offline works without a network (`wandb sync` uploads later). W&B keeps
    steps increasing only: steps run again after a crash (past the last checkpoint) are not logged a second time."""

    def __init__(self, run: str, cfg):
        import dataclasses

        import wandb

        id_file = os.path.join(run, "wandb-id")
        if os.path.exists(id_file):
            with open(id_file) as f:
                run_id = f.read().strip()
        else:
            run_id = uuid.uuid4().hex[:12]
            config_mod.write_atomic(id_file, run_id + "\n")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "tinyrl"), id=run_id, resume="allow",
                              name=os.path.basename(os.path.abspath(run)), dir=run, config=dataclasses.asdict(cfg))

    def log(self, metrics: dict) -> None:
        self.run.log(scalars(metrics), step=metrics["step"])

    def close(self) -> None:
        self.run.finish()


def live_sinks(cfg, run: str, start: int) -> list:
    """The sinks `cfg.report_to` asks for; one line (UserError) when a package is missing."""
    missing = config_mod.missing_sinks(cfg.report_to)
    if missing:
        raise UserError(missing)
    names = config_mod.report_sinks(cfg.report_to)
    return [TensorBoardSink(run, start) if name == "tensorboard" else WandbSink(run, cfg) for name in names]


def notice(line: str) -> None:
    """What a user must see even with --quiet (a fallback, a changed setting, an early stop): one line on stderr."""
    print(line, file=sys.stderr, flush=True)


def _append_jsonl(path: str, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()


def read_jsonl(path: str) -> list[dict]:
    """Complete lines only: a line cut by a crash is ignored."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return rows


def truncate_jsonl(path: str, last_step: int) -> None:
    """On resume: keep only rows with step <= last_step (the steps after the checkpoint run again)."""
    if not os.path.exists(path):
        return
    keep = [row for row in read_jsonl(path) if row.get("step", 0) <= last_step]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in keep)
    os.replace(tmp, path)


# --- what a run learned -------------------------------------------------------------------------

BARS = " ▁▂▃▄▅▆▇█"


def sparkline(values: list[float]) -> str:
    """One character per value, scaled between the min and the max.

    >>> sparkline([0.0, 0.5, 1.0])
    ' ▄█'
    """
    if not values:
        return ""
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    return "".join(BARS[round((v - lo) / span * (len(BARS) - 1))] for v in values)


def report(run: str, width: int = 60) -> str:
    """Reward curve, per-component change and the first vs the last sampled completion of a run."""
    history = read_jsonl(os.path.join(run, "metrics.jsonl"))
    if not history:
        return f"{run}: no steps logged yet"
    k = max(1, min(5, len(history) // 4))
    lines = [f"{run}: {len(history)} steps"]
    keys = ["reward/total"] + sorted(key for key in history[0] if key.startswith("reward/") and key != "reward/total")
    checked = "reward/digits" not in history[0]  # the toy task checks no answers: `correct` is always 0
    for key in keys + (["correct"] if checked else []) + ["len/mean"]:
        series = [m.get(key, 0.0) for m in history]
        stride = max(1, len(series) // width)
        curve = [sum(series[i:i + stride]) / len(series[i:i + stride]) for i in range(0, len(series), stride)]
        first, last = sum(series[:k]) / k, sum(series[-k:]) / k
        lines.append(f"  {key:<22} {first:8.3f} -> {last:8.3f}  {sparkline(curve)}")
    samples = read_jsonl(os.path.join(run, "samples.jsonl"))
    if samples:
        for label, row in (("first", samples[0]), ("last", samples[-1])):
            text = " ".join(str(row.get("completion", "")).split())[:160]
            lines.append(f"  {label} sample (step {row['step']}, reward {row.get('reward', 0):.2f}): {text}")
    return "\n".join(lines)
