"""The `tinyrl` command: fit, eval, plan, memory inspect. Flags map onto Config; user errors exit 2 in one line."""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import warnings
from typing import List, Optional

import typer

from tinyrl import config as config_mod
from tinyrl.config import Config
from tinyrl.errors import UserError

EXAMPLES = """
Examples:

  tinyrl fit arith --model smollm2-135m --steps 20 --out runs/demo     # offline, CPU, minutes
  tinyrl fit gsm8k --vram 8G                                          # Qwen2.5-0.5B, QLoRA, fits an 8 GB card
  tinyrl fit gsm8k --data ../shared/data/gsm8k --method memory-r+ --set group_size=8
  tinyrl fit gsm8k --out runs/demo --resume                           # continue after a crash
  tinyrl eval gsm8k --model smollm2-135m --data ../shared/data/gsm8k --limit 50
  tinyrl plan gsm8k --vram 8G --model Qwen/Qwen2.5-0.5B-Instruct
"""

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Memory-R+ reinforcement learning for small language models on one small GPU.\n" + EXAMPLES,
                  context_settings={"help_option_names": ["-h", "--help"]})

SET_HELP = "Any Config field as key=value (repeatable); `tinyrl settings` lists them."


def build_config(base: Config, flags: dict, pairs: list[str]) -> Config:
    """Apply first-class flags that were given (not None), then --set pairs; type-checked and validated."""
    given = {k: v for k, v in flags.items() if v is not None}
    return config_mod.apply_overrides(dataclasses.replace(base, **given), pairs)


@app.command(epilog=EXAMPLES)
def fit(task: str = typer.Argument(..., help="gsm8k, arith (offline synthetic) or toy"),
        model: Optional[str] = typer.Option(None, help="Hub name, local folder, or smollm2-135m (offline)."),
        method: Optional[str] = typer.Option(None, help="r1, cosine, memory-r, memory-r+"),
        steps: Optional[int] = typer.Option(None, help="Optimizer steps (0 = one epoch)."),
        out: Optional[str] = typer.Option(None, help="Run folder (default runs/run)."),
        vram: Optional[str] = typer.Option(None, help="GPU memory budget, e.g. 8G: the planner picks settings."),
        data: Optional[str] = typer.Option(None, help="Local GSM8K-format jsonl/parquet file or folder."),
        seed: Optional[int] = typer.Option(None, help="Random seed."),
        set_: List[str] = typer.Option([], "--set", help=SET_HELP),
        resume: bool = typer.Option(False, "--resume", help="Continue the run in --out with its saved settings."),
        quiet: bool = typer.Option(False, "--quiet", help="No progress output.")):
    """Train a policy with GRPO (+ Memory-R+) and checkpoint it; rerunning the same command resumes."""
    from tinyrl import loop

    flags = {"task": task, "model": model, "method": method, "steps": steps, "out": out, "vram": vram,
             "data": data, "seed": seed}
    base = Config()
    if resume:
        run = out or base.out
        saved = os.path.join(run, "config.json")
        if not os.path.exists(saved):
            raise UserError(f"--resume: {run} holds no run (no config.json); drop --resume to start one")
        base = config_mod.load(saved)
        flags = {k: v for k, v in flags.items() if k != "task" or v != base.task}
    loop.fit(build_config(base, flags, set_), quiet=quiet)


@app.command("eval", epilog=EXAMPLES)
def eval_(task: str = typer.Argument(..., help="gsm8k or arith"),
          model: Optional[str] = typer.Option(None, help="Base model (default: the adapter run's model)."),
          adapter: Optional[str] = typer.Option(None, help="A run folder (its latest checkpoint) or checkpoint folder."),
          data: Optional[str] = typer.Option(None, help="Local GSM8K-format test file or folder."),
          limit: Optional[int] = typer.Option(None, help="Evaluate the first N examples."),
          out: Optional[str] = typer.Option(None, help="Per-example jsonl (default eval-<task>.jsonl in the run "
                                                         "folder, else in the current folder)."),
          set_: List[str] = typer.Option([], "--set", help=SET_HELP)):
    """Greedy evaluation: exact match on the <answer> tag and numeric extractive match."""
    from tinyrl import checkpoint, loop

    base = Config()
    adapter_dir = None
    if adapter:
        adapter_dir = adapter
        if os.path.exists(os.path.join(adapter, "config.json")) and not os.path.exists(
                os.path.join(adapter, "adapter_config.json")):
            base = config_mod.load(os.path.join(adapter, "config.json"))
            adapter_dir = checkpoint.latest(adapter)
            if adapter_dir is None:
                raise UserError(f"--adapter {adapter}: the run has no checkpoint yet")
        elif not os.path.exists(os.path.join(adapter, "adapter_config.json")):
            raise UserError(f"--adapter {adapter}: not a run folder or a checkpoint (no adapter_config.json)")
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1 (got {limit})")
    cfg = build_config(base, {"task": task, "model": model, "data": data}, set_)
    out_path = out or os.path.join(adapter if adapter and adapter_dir != adapter else ".", f"eval-{task}.jsonl")
    result = loop.evaluate(cfg, adapter_dir, limit, out_path)
    print(f"eval {task}: exact_match {result['exact_match']:.4f}  extractive_match {result['extractive_match']:.4f}"
          f"  n={result['n']}  (per-example: {out_path})")


@app.command()
def settings():
    """List every Config field with its default and meaning."""
    docs = config_mod.field_docs()
    for name, f in config_mod.FIELDS.items():
        print(f"{name} = {f.default!r}\n    {docs.get(name, '')}")


def main() -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecation chatter from transformers/peft
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # "kernels not installed" on every CPU import
    try:
        app(standalone_mode=False)
    except UserError as err:
        print(f"tinyrl: error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("tinyrl: interrupted; rerun the same command to resume from the last checkpoint", file=sys.stderr)
        sys.exit(130)
    except Exception as err:  # usage errors from typer's click (vendored in new typer): one line, exit 2
        if callable(getattr(err, "format_message", None)) and hasattr(err, "exit_code"):
            print(f"tinyrl: error: {err.format_message()}", file=sys.stderr)
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
