"""The `tinyrl` command: fit, eval, plan, memory inspect. Flags map onto Config; user errors exit 2 in one line."""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import sys
import warnings
from typing import List, Optional

import typer

from tinyrl import config as config_mod
from tinyrl.config import Config
from tinyrl.errors import Stopped, UserError

EXAMPLES = """
Examples (each subcommand's --help has its own):

  tinyrl fit toy --model smollm2-135m --out runs/first --steps 20 \\
    --set prompts_per_step=4 --set group_size=4 --set max_new_tokens=24
      # offline, 2 CPU cores: about 5 minutes (make demo runs the same)
  tinyrl plan gsm8k --vram 8G   # the settings an 8 GB card fits, and why
  tinyrl fit gsm8k --vram 8G    # trains with them (a GPU; the hub's GSM8K)
  tinyrl eval arith --adapter runs/first --limit 50
"""
FIT_EXAMPLES = """
Examples:

  tinyrl fit toy --model smollm2-135m --out runs/first --steps 20 \\
    --set prompts_per_step=4 --set group_size=4 --set max_new_tokens=24
      # offline, 2 CPU cores: about 5 minutes
  tinyrl fit toy --out runs/first --resume --steps 40
      # continue it to 40 steps, with its saved settings (a plain
      # rerun of the first command resumes a stopped run as it was)
  tinyrl fit gsm8k --vram 8G --method memory-r+
      # a GPU: Qwen2.5-0.5B with what `tinyrl plan` picks for 8 GB
  tinyrl fit gsm8k --data my/gsm8k --vram 8G
      # a local folder with train.jsonl and test.jsonl (question, answer)
"""
EVAL_EXAMPLES = """
Examples:

  tinyrl eval arith --adapter runs/first --limit 50     # its last checkpoint
  tinyrl eval arith --adapter runs/first --checkpoints all
  tinyrl eval gsm8k --model smollm2-135m --limit 50     # the base model
"""
PLAN_EXAMPLES = """
Examples:

  tinyrl plan gsm8k --vram 8G               # Qwen2.5-0.5B-Instruct
  tinyrl plan gsm8k --vram 15G --gpu T4     # a free Colab/Kaggle T4
  tinyrl plan arith --vram 4G --model smollm2-135m --gpu cpu
"""

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Memory-R+ reinforcement learning for small language models on one small GPU.\n" + EXAMPLES,
                  context_settings={"help_option_names": ["-h", "--help"]})

SET_HELP = "Any Config field as key=value (repeatable); `tinyrl settings` lists them."


def build_config(base: Config, flags: dict, pairs: list[str]) -> Config:
    """Apply first-class flags that were given (not None), then --set pairs; type-checked and validated. A setting
    given both ways is refused (one would silently win)."""
    given = {k: v for k, v in flags.items() if v is not None}
    both = sorted(set(given) & set_keys(pairs))
    if both:
        name = both[0]
        flag = "the TASK argument" if name == "task" else f"--{name.replace('_', '-')} {given[name]}"
        raise UserError(f"{name} is given twice ({flag} and --set {name}=...): keep one")
    if given.get("model"):
        config_mod.refuse_run_folder_as_model(given["model"])
    return config_mod.apply_overrides(dataclasses.replace(base, **given), pairs)


DEFAULT = Config()
TASK_HELP = "gsm8k, arith (offline synthetic), toy, ai-mo, or custom (your --data and --reward)"
DATA_HELP = ("Your data: a jsonl/json/parquet/csv file, a folder with train.jsonl and test.jsonl, or a hub dataset "
             "name. Rows: a prompt column, or question + answer columns (--set question_column / answer_column).")


@app.command(epilog=FIT_EXAMPLES)
def fit(task: str = typer.Argument(..., help=TASK_HELP),
        model: Optional[str] = typer.Option(None, help="Hub name, local folder, or smollm2-135m (offline). "
                                                       f"Default: {DEFAULT.model}."),
        method: Optional[str] = typer.Option(None, help=f"r1, cosine, memory-r, memory-r+. Default: "
                                                        f"{DEFAULT.method}."),
        steps: Optional[int] = typer.Option(None, help=f"Optimizer steps (0 = one epoch). Default: {DEFAULT.steps}."),
        out: Optional[str] = typer.Option(None, help=f"Run folder. Default: {DEFAULT.out}."),
        vram: Optional[str] = typer.Option(None, help="GPU memory budget, e.g. 8G: the planner picks settings."),
        data: Optional[str] = typer.Option(None, help=DATA_HELP),
        reward: List[str] = typer.Option([], "--reward", help="Your reward function, path/to/file.py:function or "
                                         "package.module:function (repeatable); TRL's contract: f(prompts, "
                                         "completions, completion_ids, **columns) -> list of floats."),
        seed: Optional[int] = typer.Option(None, help="Random seed."),
        set_: List[str] = typer.Option([], "--set", help=SET_HELP),
        resume: bool = typer.Option(False, "--resume", help="Continue the run in --out with its saved settings."),
        quiet: bool = typer.Option(False, "--quiet", help="No progress output.")):
    """Train a policy with GRPO (+ Memory-R+) and checkpoint it; rerunning the same command resumes.
    SIGINT/SIGTERM stop it within seconds, at the next batch, with a checkpoint (a second one at once)."""
    flags = {"task": task, "model": model, "method": method, "steps": steps, "out": out, "vram": vram,
             "data": data, "seed": seed, "reward_funcs": ",".join(reward) or None}
    base = config_mod.for_task(task)
    if resume:
        run = out or base.out
        saved = os.path.join(run, "config.json")
        if not os.path.exists(saved):
            raise UserError(f"--resume: {run} holds no run (no config.json); drop --resume to start one")
        base = config_mod.load(saved)
        if task != base.task:  # said before its data (the run's --data, not the user's) is read for the new task
            raise UserError(f"--resume: {run} is a {base.task} run and its task cannot change; run `tinyrl fit "
                            f"{base.task} --out {run} --resume`, or start the {task} run in another --out")
        flags = {k: v for k, v in flags.items() if k != "task"}
    pins = frozenset(k for k, v in flags.items() if v is not None) | set_keys(set_)
    cfg = build_config(base, flags, set_)
    missing = config_mod.missing_sinks(cfg.report_to)
    if missing:  # before minutes of loading
        raise UserError(missing)
    if cfg.deterministic:  # before torch loads: MKL and cuBLAS read these once
        os.environ.update(config_mod.DETERMINISTIC_ENV)
    from tinyrl import budget, loop

    if cfg.vram and not budget.detect_caps(cfg.device).cuda:
        print(f"note: no CUDA device here: --vram {cfg.vram} budgets this machine's RAM for a CPU run (peak RSS is "
              "measured as mem/* in metrics.jsonl)", file=sys.stderr, flush=True)
    quiet_loading_bars()
    loop.fit(cfg, quiet=quiet, pins=pins, resume=resume)


@app.command("eval", epilog=EVAL_EXAMPLES)
def eval_(task: str = typer.Argument(..., help="gsm8k, arith, ai-mo, math-500, aime24, or custom (--data with a "
                                                "gold answer column)"),
          model: Optional[str] = typer.Option(None, help="Base model (default: the adapter run's model, else "
                                                         f"{DEFAULT.model})."),
          adapter: Optional[str] = typer.Option(None, help="A run folder (its latest checkpoint) or checkpoint folder."),
          checkpoints: str = typer.Option("latest", help="latest, or all: every checkpoint of the run folder given "
                                                         "as --adapter, then the best and the last."),
          data: Optional[str] = typer.Option(None, help="Test data instead of the task's: a jsonl/json/parquet/csv "
                                                        "file, a folder with test.jsonl, or a hub dataset name."),
          limit: Optional[int] = typer.Option(None, help="Evaluate the first N examples."),
          out: Optional[str] = typer.Option(None, help="Per-example jsonl (default eval-<task>.jsonl in the run "
                                                         "folder, else in the current folder; with --checkpoints "
                                                         "all, eval-<task>-step-N.jsonl in the run folder)."),
          set_: List[str] = typer.Option([], "--set", help=SET_HELP)):
    """Greedy evaluation: exact match on the <answer> tag and extractive match (math-verify, as LightEval)."""
    from tinyrl import checkpoint, evaluate

    if checkpoints not in ("latest", "all"):
        raise UserError(f"--checkpoints must be latest or all (got {checkpoints!r})")
    from tinyrl import tasks

    if tasks.reward_kind(task) == "toy":
        raise UserError("eval toy: the toy task has no answers to check (its reward is the share of digits); "
                        "`tinyrl report RUN` shows what a toy run learned")
    base = fresh = config_mod.for_task(task)
    adapter_dir, results_dir = None, "."
    if adapter:
        adapter_dir = adapter
        if os.path.exists(os.path.join(adapter, "config.json")) and not os.path.exists(
                os.path.join(adapter, "adapter_config.json")):
            base, results_dir = config_mod.load(os.path.join(adapter, "config.json")), adapter
            adapter_dir = checkpoint.latest(adapter)
            if adapter_dir is None:
                raise UserError(f"--adapter {adapter}: the run has no checkpoint yet")
        elif not os.path.exists(os.path.join(adapter, "adapter_config.json")):
            raise UserError(f"--adapter {adapter}: not a run folder or a checkpoint (no adapter_config.json)")
        else:  # a checkpoint folder RUN/checkpoints/step-N: the settings of RUN, when it is there
            run_config = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(adapter))), "config.json")
            if os.path.exists(run_config):
                base = config_mod.load(run_config)
        if base.task != task and data is None:  # the run's --data was its task's: not this task's, nor the user's
            base = dataclasses.replace(base, data=None)
    if checkpoints == "all" and results_dir == ".":
        raise UserError("--checkpoints all needs a run folder as --adapter (one with config.json and checkpoints/)")
    if checkpoints == "all" and out:
        raise UserError("--out names one file; --checkpoints all writes eval-<task>-step-N.jsonl in the run folder")
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1 (got {limit})")
    cfg = build_config(base, {"task": task, "model": model, "data": data}, set_)
    quiet_loading_bars()
    if checkpoints == "all":
        print(f"eval {task}: greedy, max_new_tokens {cfg.max_new_tokens} (the run's; --set max_new_tokens=N to "
              "change)", flush=True)
        print(evaluate.report_checkpoints(evaluate.evaluate_checkpoints(cfg, results_dir, limit), results_dir, task))
        return
    out_path = out or os.path.join(results_dir, f"eval-{task}.jsonl")
    whose = " (the run's; --set max_new_tokens=N to change)" if base != fresh else ""
    print(f"eval {task}: greedy, max_new_tokens {cfg.max_new_tokens}{whose}", flush=True)
    result = evaluate.evaluate(cfg, adapter_dir, limit, out_path)
    success = f"  success {result['success']:.4f} ({cfg.success})" if "success" in result else ""
    print(f"eval {task}: exact_match {result['exact_match']:.4f}  extractive_match {result['extractive_match']:.4f}"
          f"{success}  n={result['n']}  (per-example: {out_path})")


@app.command(epilog=PLAN_EXAMPLES)
def plan(task: str = typer.Argument(..., help=TASK_HELP),
         vram: str = typer.Option(..., help="Memory budget, e.g. 8G, 7.5GiB, 6000M."),
         model: Optional[str] = typer.Option(None, help="Hub name (config only, no weights), local folder, "
                                                         "config.json, or smollm2-135m."),
         gpu: str = typer.Option("cuda", help="Device to plan for: cuda (any bf16 GPU), T4, P100, V100, L4, A10G, "
                                              "A100, H100, or cpu."),
         data: Optional[str] = typer.Option(None, help="Local data, to measure real prompt lengths."),
         method: Optional[str] = typer.Option(None, help="r1, cosine, memory-r, memory-r+"),
         set_: List[str] = typer.Option([], "--set", help=SET_HELP + " Planner settings set here are pinned.")):
    """Print where every byte goes and the settings that fit the budget, without loading any weights."""
    from tinyrl import budget, loop

    cfg = build_config(config_mod.for_task(task), {"task": task, "model": model, "data": data, "vram": vram,
                                                   "method": method}, set_)
    print(budget.format_plan(loop.make_plan(cfg, frozenset(set_keys(set_)), budget.device_caps(gpu))))


QUIET_BARS = ("Loading weights", "Writing model shards")  # transformers' bars over files already on disk


def quiet_loading_bars() -> None:
    """Hide transformers' progress bars over weights already on disk (a download keeps its bar: it can take
    minutes). Its tqdm hook exists in transformers >= 5.2x; older ones keep their bars."""
    from transformers.utils import logging as hf_logging

    def hook(factory, args, kwargs):
        return factory(*args, **{**kwargs, "disable": True} if kwargs.get("desc") in QUIET_BARS else kwargs)

    if hasattr(hf_logging, "set_tqdm_hook"):
        hf_logging.set_tqdm_hook(hook)


def set_keys(pairs: list[str]) -> set[str]:
    return {p.split("=", 1)[0].strip().replace("-", "_") for p in pairs}


memory_app = typer.Typer(help="Look inside a run's episodic memories (methods memory-r, memory-r+).",
                         no_args_is_help=True)
app.add_typer(memory_app, name="memory")


@memory_app.command("inspect")
def memory_inspect(run: str = typer.Argument(..., help="A run folder trained with a memory method."),
                   question: Optional[str] = typer.Option(None, help="Show the stored questions nearest to this."),
                   n: int = typer.Option(5, help="Neighbours to show.")):
    """Both memories' sizes at the last checkpoint and, for a question, its nearest stored questions with
    sample traces (from samples.jsonl; the memory itself keeps embeddings, not text)."""
    from tinyrl import checkpoint, encoder, memory, meter

    if not os.path.exists(os.path.join(run, "config.json")):
        raise UserError(f"{run}: no config.json; is it a run folder?")
    cfg = config_mod.load(os.path.join(run, "config.json"))
    ckpt = checkpoint.latest(run)
    if ckpt is None or not os.path.isdir(os.path.join(ckpt, "memory")):
        raise UserError(f"{run}: no checkpoint with a memory yet (method {cfg.method})")
    state = memory.MemoryState.open(os.path.join(ckpt, "memory"))
    stats = state.stats()
    print(f"{ckpt}:")
    for name in ("success", "failure"):
        print(f"  {name:<8} {stats[name + '_keys']:>7} questions  {stats[name + '_values']:>8} traces")
    print(f"  explore {'on' if stats['explore_on'] else 'off'} (warm-up {cfg.explore_warmup} failure questions)  "
          f"{folder_bytes(os.path.join(ckpt, 'memory')) / 2**20:.2f} MiB on disk")
    if not question:
        return
    enc = encoder.load(cfg.encoder)
    traces: dict[str, list[str]] = {}
    for row in meter.read_jsonl(os.path.join(run, "samples.jsonl")):
        traces.setdefault(row.get("question", ""), []).append(row.get("completion", ""))
    for nb in state.nearest(enc.encode([question])[0], n):
        print(f"  [{nb.memory}] distance {nb.distance:.3f}  {nb.values} traces  {nb.question[:100]}")
        for text in traces.get(nb.question, [])[:2]:
            print(f"      trace: {' '.join(text.split())[:140]}")


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(base, f)) for base, _, files in os.walk(path) for f in files)


@app.command()
def report(runs: List[str] = typer.Argument(..., help="One or more run folders (several: overlaid in the plots)."),
           plots: bool = typer.Option(True, "--plots/--no-plots", help="Also write PNG plots (needs matplotlib)."),
           out: Optional[str] = typer.Option(None, help="Folder for the PNGs (default RUN/plots, or for several "
                                                         "runs FIRST/plots-vs-SECOND-...).")):
    """What runs learned: reward curves (first vs last steps) and sample completions, and PNG plots of rewards,
    correctness, held-out accuracy, length, KL, memory, time and peak memory per phase."""
    from tinyrl import meter
    from tinyrl import plots as plots_mod

    for run in runs:
        if not os.path.exists(os.path.join(run, "metrics.jsonl")):
            raise UserError(f"{run}: no metrics.jsonl; is it a run folder?")
    for run in runs:
        print(meter.report(run))
    if not plots:
        return
    if not plots_mod.available():
        print("note: no plots: pip install 'tinyrl[plots]' (matplotlib) to get PNGs", file=sys.stderr)
        return
    labels = {}
    for run in runs:
        saved = os.path.join(run, "config.json")
        method = config_mod.load(saved).method if os.path.exists(saved) else "?"
        label = f"{os.path.basename(os.path.normpath(run))} ({method})"
        labels[label if label not in labels else f"{os.path.normpath(run)} ({method})"] = meter.read_jsonl(
            os.path.join(run, "metrics.jsonl"))
    names = [os.path.basename(os.path.normpath(run)) for run in runs[1:]]
    folder = out or os.path.join(runs[0], "plots" + "".join(f"-vs-{n}" for n in names))
    for path in plots_mod.write(labels, folder):
        print(f"wrote {path}")


@app.command()
def settings():
    """List every Config field with its default and meaning."""
    docs = config_mod.field_docs()
    for name, f in config_mod.FIELDS.items():
        per_task = ", ".join(f"{t}: {d[name]!r}" for t, d in config_mod.TASK_DEFAULTS.items() if name in d)
        print(f"{name} = {f.default!r}" + (f"  ({per_task})" if per_task else "") + f"\n    {docs.get(name, '')}")


def main() -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecation chatter from transformers/peft
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # "kernels not installed" on every CPU import
    logging.getLogger("kernels").setLevel(logging.ERROR)  # "Skipping publisher trust check" offline, every load
    try:
        code = app(standalone_mode=False)  # typer turns Ctrl-C into a returned 130 here, not an exception
    except UserError as err:
        print(f"tinyrl: error: {err}", file=sys.stderr)
        sys.exit(2)
    except Stopped as stop:
        print(f"tinyrl: {stop}", file=sys.stderr)
        sys.exit(stop.code)
    except KeyboardInterrupt:
        code = 130
    except OSError as err:  # a full disk outside a checkpoint (metrics, config): one line; checkpoints are whole
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"tinyrl: error: disk full ({err.filename or err}); free some space and rerun the same command to "
              "resume from the last checkpoint", file=sys.stderr)
        sys.exit(2)
    except Exception as err:  # usage errors from typer's click (vendored in new typer): one line, exit 2
        if callable(getattr(err, "format_message", None)) and hasattr(err, "exit_code"):
            print(f"tinyrl: error: {err.format_message()}", file=sys.stderr)
            sys.exit(2)
        raise
    if code == 130:
        print("tinyrl: interrupted; rerun the same command to resume from the last checkpoint", file=sys.stderr)
    if isinstance(code, int) and code:
        sys.exit(code)


if __name__ == "__main__":
    main()
