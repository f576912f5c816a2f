"""The comparison grid (issue #25): r1, cosine, memory-r and memory-r+ on the offline `arith` task at two
difficulties, seeds 0, 1 and 2, from SmolLM2-135M-Instruct, every run for the same 20 steps at learn.py's settings
(96 new tokens, as bench/results/learn_cpu.json's run), a checkpoint every 5 steps, all of them kept.

Per run, after training: greedy held-out accuracy (exact match on <answer>, extractive match) of every checkpoint
at 96 new tokens; the best checkpoint (highest extractive, evaluate.best_and_last) and the last one again at 256
(the concision control: is a gain only shorter answers?); the diversity of the last checkpoint: 3 samples at the
run's temperature for each of the first 100 held-out questions, lexical (distinct-1/2/3) and semantic (the mean
pairwise cosine distance of their MiniLM embeddings). The base model gets the same per difficulty. Every run and
the base are evaluated on one held-out slice, the first 300 test problems of the seed-0 split with seed-0 few-shot
picks (arith draws its problems by seed); each run records how many of them its training batches contained.

Order of work: r1 and memory-r+ for every seed and both difficulties, then cosine and memory-r. Each stage's
result lands in RUN/result.json as it completes, so rerunning the same command skips what is done, and a run cut
short in training resumes from its newest checkpoint (fit's own resume). bench/results/learn_grid_cpu.json is
rebuilt from those files after every stage, with the summary this prints at the end; the plots go to
bench/results/learn_grid_cpu/. Run folders: bench/runs/learn-grid/ (gitignored), e.g. easy-memory-r+-s0.

Persistence: the run folders stay on the machine that made them; the committed aggregate is the record of finished
work. Each of its run and base entries holds the settings that made it (`fingerprint`). A run (or base-DIFFICULTY)
without a folder that the aggregate holds finished, made with the same settings, is not computed again (no
training, no evaluation, no model loaded): its entry is carried over unchanged, and `carried_over` names the
command whose run folder it was last built from. A run with a folder is built from its folder, as ever; a run
without a folder that the aggregate holds only partly done starts over from scratch (its checkpoints are gone),
and says so. Every finished entry of the file is kept, listed by this invocation or not (--methods r1 keeps the
memory-r+ runs). So commit the aggregate before a session stops: a run cut short whose folder is lost starts over.

    OMP_NUM_THREADS=1 python bench/learn.py --grid --set threads=1 --shared-cpu   # all of it, hours a run
    python bench/learn.py --grid --methods r1 memory-r+ --seeds 0 --difficulties hard
    python bench/learn.py --grid --smoke --root /tmp/grid --out /tmp/grid.json    # the tiny random model
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import platform
import shlex
import time

import numpy as np
import torch
import transformers

import learn
from hardware import cpu_name
from tinyrl import checkpoint, encoder, evaluate, loop, meter, plots, policy, prompts, tasks
from tinyrl import config as config_mod
from tinyrl.config import METHODS, RESUMABLE, Config

OUT = os.path.join(learn.HERE, "results", "learn_grid_cpu.json")
ROOT = os.path.join(learn.HERE, "runs", "learn-grid")
DIFFICULTIES = {"easy": {"arith_ops": "1", "arith_max": 10}, "hard": {"arith_ops": "2", "arith_max": 10}}
FIRST = ("r1", "memory-r+")  # every seed and difficulty of these before the other methods
GRID = dict(steps=20, max_new_tokens=96, save_every=5, keep_checkpoints=0)  # keep_checkpoints 0 keeps them all
LONG = 256  # new tokens of the concision control
EVAL_SEED = 0  # the held-out slice and its few-shot picks, the same for every run and the base
DIVERSITY = {"questions": 100, "samples": 3, "seed": 0}
SMOKE = dict(max_new_tokens=8, encoder="hashing", prompts_per_step=2, group_size=4, gen_batch=8, micro_batch=4,
             steps=2, save_every=1)


@dataclasses.dataclass(frozen=True)
class Grid:
    """What one invocation works through, and where it writes."""

    root: str  # run folders
    out: str  # the aggregate file
    configs: dict[str, Config]  # difficulty -> the settings its runs share (method and seed aside)
    runs: list[tuple[str, str, int]]  # (difficulty, method, seed), in the order of work
    limit: int  # held-out problems
    long: int  # the generous budget
    diversity: dict
    shared_cpu: bool
    command: str
    commit: str  # of the code this process runs (read once: another commit may land while it runs)
    started: float
    carried: dict[str, dict] = dataclasses.field(default_factory=dict)  # folder name -> the aggregate's finished
    # entry, for the runs and bases without a folder that this invocation does not compute again (see `plan`)


def order(methods: list[str], seeds: list[int], difficulties: list[str]) -> list[tuple[str, str, int]]:
    """The order of work: FIRST's methods before the others; within each, by seed, then difficulty, then method.

    >>> order(["r1", "cosine", "memory-r+"], [0, 1], ["easy", "hard"])[:5]
    [('easy', 'r1', 0), ('easy', 'memory-r+', 0), ('hard', 'r1', 0), ('hard', 'memory-r+', 0), ('easy', 'r1', 1)]
    >>> order(["r1", "cosine", "memory-r+"], [0, 1], ["easy"])[4:]
    [('easy', 'cosine', 0), ('easy', 'cosine', 1)]
    """
    runs = [(d, m, s) for d in difficulties for m in methods for s in seeds]
    return sorted(runs, key=lambda r: (r[1] not in FIRST, r[2], difficulties.index(r[0]), methods.index(r[1])))


def setup(args, argv: list[str]) -> Grid:
    """The grid learn.py's arguments ask for (--smoke: the tiny random model, 2 steps, tiny slices)."""
    root = os.path.abspath(args.root or ROOT)
    base, limit, long, diversity = dict(learn.BASE, **GRID), args.limit or 300, LONG, dict(DIVERSITY)
    if args.smoke:
        from tiny import make_tiny_model  # tests/, put on the path by learn.py

        base.update(SMOKE, model=make_tiny_model(os.path.join(root, "tiny-model")))
        limit, long, diversity = 4, 16, dict(DIVERSITY, questions=2)
    base.update(steps=args.steps or base["steps"], max_minutes=args.minutes)
    difficulties = args.difficulties or (["easy"] if args.smoke else list(DIFFICULTIES))
    configs = {d: config_mod.apply_overrides(Config(**{**base, **DIFFICULTIES[d]}), args.sets) for d in difficulties}
    methods = args.methods or (list(FIRST) if args.smoke else list(METHODS))
    seeds = args.seeds or ([0] if args.smoke else [0, 1, 2])
    grid = Grid(root, os.path.abspath(args.out or OUT), configs, order(methods, seeds, difficulties), limit, long,
                diversity, args.shared_cpu, shlex.join(["python", "bench/learn.py", *argv]), learn.commit(),
                time.perf_counter())
    plan(grid)
    return grid


def listed(grid: Grid) -> list[tuple[str, str, str, Config, dict]]:
    """What this invocation computes: (kind "base" or "run", folder name, difficulty, settings, fingerprint), the
    bases first."""
    bases = [("base", f"base-{d}", d, c, fingerprint(grid, c)) for d, c in grid.configs.items()]
    runs = [("run", d, run_config(grid, d, m, s)) for d, m, s in grid.runs]
    return bases + [(kind, os.path.basename(c.out), d, c, fingerprint(grid, c)) for kind, d, c in runs]


def recorded(aggregate: dict, kind: str, name: str) -> dict | None:
    """The entry of run (or base) `name` in an aggregate file's contents, if any."""
    if kind == "base":
        return (aggregate.get("base") or {}).get(name.removeprefix("base-"))
    return (aggregate.get("runs") or {}).get(name)


def plan(grid: Grid) -> None:
    """Fill grid.carried from the aggregate file: every listed run or base without a folder that the file holds
    finished, with this grid's fingerprint. Prints a line for each run without a folder that the file holds: carried
    over, or computed again (partly done: its checkpoints are gone; or made with other settings)."""
    old = read_aggregate(grid.out)
    for kind, name, _, cfg, fp in listed(grid):
        entry = recorded(old, kind, name)
        if not any(v for k, v in (entry or {}).items() if k != "fingerprint") or os.path.exists(
                os.path.join(grid.root, name)):
            continue  # nothing recorded, or its folder exists: as ever
        made = entry.get("fingerprint") or {}
        if made and not differ(fp, made) and finished(entry, kind, old, cfg, grid.long):
            grid.carried[name] = entry
            print(f"{name}: finished in {grid.out}, same settings, no folder: carried over, not computed again",
                  flush=True)
        elif finished(entry, kind, old):
            why = ", ".join(differ(fp, made)) if made else "none recorded"
            print(f"{name}: finished in {grid.out} with other settings ({why or 'steps or checkpoints'}), no folder: "
                  "computing it again", flush=True)
        else:
            print(f"{name}: only partly done in {grid.out} and its folder {os.path.join(grid.root, name)} is gone (its "
                  "checkpoints with it): starting it over from scratch", flush=True)


def finished(entry: dict | None, kind: str, aggregate: dict, cfg: Config | None = None,
             long: int | None = None) -> bool:
    """Whether an aggregate entry of a run (kind "run") or a base ("base") holds every stage: the ones `cfg` and
    `long` ask for when given (the steps, checkpoints and budgets this invocation would compute), else the ones it
    was made with (its fingerprint's budgets; `aggregate`'s, the file it is from, for an entry without one)."""
    if not entry or entry.get("diversity") is None:
        return False
    if cfg is not None:
        budgets = [cfg.max_new_tokens, long]
    elif entry.get("fingerprint"):
        budgets = [entry["fingerprint"]["max_new_tokens"], entry["fingerprint"]["eval"]["long"]]
    else:  # written before the entries held their fingerprint
        budgets = (aggregate.get("held_out") or {}).get("budgets") or []
    budgets = [str(b) for b in budgets]
    if not budgets:
        return False
    if kind == "base":
        return all(entry.get(b) is not None for b in budgets)
    if not all((entry.get(slot) or {}).get(b) is not None for slot in ("last", "best") for b in budgets):
        return False
    if cfg is None:
        return entry.get("steps_done") is not None
    return entry.get("steps_done") == cfg.steps and set(entry.get("curve") or {}) == set(
        map(str, checkpoint_steps(cfg)))


def carried(grid: Grid, name: str) -> bool:
    """Whether this invocation skips run (or base) `name`: finished in the aggregate, and still no folder."""
    return name in grid.carried and not os.path.exists(os.path.join(grid.root, name))


def main(args, argv: list[str]) -> None:
    grid = setup(args, argv)
    threads = {cfg.threads for cfg in grid.configs.values()}.pop()
    if threads:
        torch.set_num_threads(threads)  # fit sets it too; the evaluations run here
    for difficulty, method, seed in grid.runs:
        run(grid, difficulty, method, seed)
        plot(grid, write_aggregate(grid))
    for difficulty in grid.configs:
        base(grid, difficulty)  # done already, unless a difficulty has no run
    results = write_aggregate(grid)
    plot(grid, results)
    print(format_summary(results), flush=True)
    print(f"wrote {grid.out}", flush=True)


# --- stages: each stored in its folder's result.json as it completes ---------------------------------------------


def run_config(grid: Grid, difficulty: str, method: str, seed: int) -> Config:
    return config_mod.validate(dataclasses.replace(grid.configs[difficulty], method=method, seed=seed,
                                                   out=os.path.join(grid.root, f"{difficulty}-{method}-s{seed}")))


def eval_config(cfg: Config, max_new_tokens: int | None = None) -> Config:
    """How a run (or the base) is evaluated: on the seed-0 held-out slice, at `max_new_tokens` (default its own)."""
    return dataclasses.replace(cfg, seed=EVAL_SEED, max_new_tokens=max_new_tokens or cfg.max_new_tokens)


def checkpoint_steps(cfg: Config) -> list[int]:
    """The steps fit saves at: every save_every, and the last.

    >>> checkpoint_steps(Config(steps=20, save_every=5)), checkpoint_steps(Config(steps=7, save_every=5))
    ([5, 10, 15, 20], [5, 7])
    """
    return sorted(set(range(cfg.save_every, cfg.steps + 1, cfg.save_every)) | {cfg.steps})


def base(grid: Grid, difficulty: str) -> None:
    """The base model of a difficulty: held-out accuracy at both budgets, and its diversity."""
    if carried(grid, f"base-{difficulty}"):
        return
    cfg = eval_config(grid.configs[difficulty])
    folder = os.path.join(grid.root, f"base-{difficulty}")
    result = open_result(folder, fingerprint(grid, grid.configs[difficulty]))
    model = Policy(cfg, None)
    examples = tasks.for_run(cfg, "test", grid.limit)
    stage(grid, folder, result, f"eval/{cfg.max_new_tokens}/0", lambda: held_out(
        *model.at(None), examples, cfg, os.path.join(folder, f"eval-{cfg.max_new_tokens}.jsonl")))
    stage(grid, folder, result, "diversity", lambda: sample_diversity(
        *model.at(None), examples[:grid.diversity["questions"]], cfg, grid.diversity,
        os.path.join(folder, "diversity.jsonl")))
    stage(grid, folder, result, f"eval/{grid.long}/0", lambda: held_out(
        *model.at(None), examples, eval_config(cfg, grid.long), os.path.join(folder, f"eval-{grid.long}.jsonl")))


def run(grid: Grid, difficulty: str, method: str, seed: int) -> None:
    """One run: train (or resume), every checkpoint at the training budget, the last and the best at the generous
    one, the last one's diversity. The base of the difficulty comes between training and evaluation, so a fresh
    grid shows training steps within minutes."""
    cfg = run_config(grid, difficulty, method, seed)
    if carried(grid, os.path.basename(cfg.out)):
        return
    result = open_result(cfg.out, fingerprint(grid, cfg))
    examples = tasks.for_run(eval_config(cfg), "test", grid.limit)
    stage(grid, cfg.out, result, "train", lambda: train(cfg, examples))
    base(grid, difficulty)
    short, model = cfg.max_new_tokens, Policy(eval_config(cfg), cfg.out)

    def evaluation(budget: int, step: int) -> dict:
        return stage(grid, cfg.out, result, f"eval/{budget}/{step}", lambda: held_out(
            *model.at(step), examples, eval_config(cfg, budget),
            os.path.join(cfg.out, f"eval-{budget}-step-{step:06d}.jsonl")))

    curve = {step: evaluation(short, step) for step in checkpoint_steps(cfg)}
    best, last = evaluate.best_and_last(curve)
    evaluation(grid.long, last)
    stage(grid, cfg.out, result, "diversity", lambda: sample_diversity(
        *model.at(last), examples[:grid.diversity["questions"]], eval_config(cfg), grid.diversity,
        os.path.join(cfg.out, "diversity.jsonl")))
    evaluation(grid.long, best)


def fingerprint(grid: Grid, cfg: Config) -> dict:
    """What a folder's results depend on: the settings fit may not change on resume, and the evaluation's."""
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RESUMABLE and k != "out"}
    return {**settings, "eval": {"limit": grid.limit, "long": grid.long, "diversity": grid.diversity,
                                 "seed": EVAL_SEED}}


def differ(new: dict, old: dict) -> list[str]:
    """The settings two fingerprints disagree on; one absent from a fingerprint (a setting added to Config after it
    was written) counts as its default, which is what that run used.

    >>> differ({"lr": 1.0, "loss": "grpo"}, {"lr": 1.0}), differ({"lr": 2.0}, {"lr": 1.0})
    ([], ['lr'])
    """
    defaults = dataclasses.asdict(Config())
    return sorted(k for k in set(new) | set(old) if new.get(k, defaults.get(k)) != old.get(k, defaults.get(k)))


def open_result(folder: str, settings: dict) -> dict:
    """The stages folder/result.json holds (none yet: an empty record); SystemExit if other settings made them."""
    path = os.path.join(folder, "result.json")
    if not os.path.exists(path):
        return {"settings": settings}
    with open(path) as f:
        result = json.load(f)
    changed = differ(settings, result.get("settings", {}))
    if changed:
        raise SystemExit(f"{folder} holds results made with other settings ({', '.join(changed)}); rerun with "
                         "those, or pass another --root")
    result["settings"] = settings  # settings added since, at their defaults: recorded as this run used them
    return result


def stage(grid: Grid, folder: str, result: dict, key: str, compute) -> dict:
    """result[key], computed and stored first if missing: folder/result.json written atomically, then the
    aggregate file rewritten."""
    if key not in result:
        print(f"{os.path.basename(folder)}: {key}", flush=True)
        os.makedirs(folder, exist_ok=True)
        result[key] = {**compute(), "commit": grid.commit, "shared_cpu": grid.shared_cpu,
                       "threads": torch.get_num_threads(), "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
        config_mod.write_atomic(os.path.join(folder, "result.json"), json.dumps(result, indent=1) + "\n")
        write_aggregate(grid)
    return result[key]


def train(cfg: Config, held_out_examples: list) -> dict:
    """loop.fit in cfg.out, which resumes from the run's newest checkpoint if it has one; the cost per step from
    metrics.jsonl (resumed runs included), and how many held-out questions the training batches contained."""
    resumed_from = checkpoint.latest_name(cfg.out)
    started = time.perf_counter()
    loop.fit(cfg, resume=True)  # resume: threads, max_minutes and the cadences may differ from the last try
    wall = time.perf_counter() - started
    rows = meter.read_jsonl(os.path.join(cfg.out, "metrics.jsonl"))
    if len(rows) < cfg.steps:
        raise SystemExit(f"{cfg.out} stopped at step {len(rows)}/{cfg.steps} (max_minutes?); rerun to resume it")
    seconds = [r["time/step"] for r in rows]
    trained = tasks.for_run(cfg, "train", None)
    seen = {ex.question for step in range(cfg.steps)
            for ex in tasks.examples_for_step(trained, step, cfg.prompts_per_step, cfg.seed)}
    return {"steps_done": len(rows), "train_seconds": round(sum(seconds), 1),
            "seconds_per_step": round(sum(seconds) / len(seconds), 1), "fit_wall_s": round(wall, 1),
            "resumed_from": resumed_from, "held_out_seen": sum(ex.question in seen for ex in held_out_examples)}


class Policy:
    """The model to evaluate, loaded on first use (a rerun with nothing left to do loads nothing); `at(step)` has
    that checkpoint's adapter in place (step None: the base model), swapped as evaluate_checkpoints swaps them."""

    def __init__(self, cfg: Config, run: str | None):
        self.cfg, self.run, self.model, self.tokenizer, self.step = cfg, run, None, None, None

    def at(self, step: int | None):
        path = None if step is None else os.path.join(checkpoint.folder(self.run), f"step-{step:06d}")
        if path and not os.path.exists(os.path.join(path, "state.json")):
            raise SystemExit(f"{path} is missing or incomplete: was keep_checkpoints changed? Remove the run folder "
                             "to train it again")
        if self.model is None:
            self.model, self.tokenizer = evaluate.load(self.cfg, path)
        elif step != self.step:
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            set_peft_model_state_dict(self.model, load_file(os.path.join(path, "adapter_model.safetensors")))
        self.step = step
        return self.model, self.tokenizer


def held_out(model, tokenizer, examples: list, cfg: Config, out_path: str) -> dict:
    """Greedy held-out accuracy (evaluate.run_eval), per-example rows to out_path, and its seconds."""
    started = time.perf_counter()
    metrics = evaluate.run_eval(model, tokenizer, examples, cfg, out_path, progress=True)
    return {**metrics, "seconds": round(time.perf_counter() - started, 1)}


def sample_diversity(model, tokenizer, examples: list, cfg: Config, settings: dict, out_path: str) -> dict:
    """settings["samples"] completions per question, sampled at cfg's temperature under settings["seed"]; their
    diversity (rows to out_path) and its seconds."""
    started, k = time.perf_counter(), settings["samples"]
    torch.manual_seed(settings["seed"])  # the sampler's uniforms come from torch's generator
    rendered = prompts.render(examples, tokenizer, cfg.max_prompt_tokens, few_shot=cfg.few_shot, seed=cfg.seed,
                              system_prompt=evaluate.system_prompt(cfg.task))
    out = policy.generate(model, tokenizer, rendered, group_size=k, max_new_tokens=cfg.max_new_tokens,
                          gen_batch=cfg.gen_batch, temperature=cfg.temperature, top_p=cfg.top_p,
                          decode_mode=cfg.decode)
    groups = [list(out.completions[i * k:(i + 1) * k]) for i in range(len(examples))]  # P lists of G texts
    config_mod.write_atomic(out_path, "".join(json.dumps({"index": ex.index, "question": ex.question,
                                                          "completions": g}) + "\n" for ex, g in zip(examples, groups)))
    return {**diversity(groups, load_encoder(cfg.encoder).encode), "questions": len(groups), "samples": k,
            "temperature": cfg.temperature, "seconds": round(time.perf_counter() - started, 1)}


@functools.lru_cache(maxsize=2)
def load_encoder(name: str):
    return encoder.load(name, "cuda" if torch.cuda.is_available() else "cpu")


# --- diversity: pure functions ------------------------------------------------------------------------------------


def distinct_n(texts: list[str], n: int) -> float:
    """Unique n-grams over all n-grams of `texts` (words split on white space), pooled; 0.0 when there is none.

    >>> distinct_n(["a b a", "a b"], 1)  # words a b a a b: 2 unique of 5
    0.4
    >>> round(distinct_n(["a b a", "a b"], 2), 4)  # (a b) (b a) | (a b): 2 unique of 3
    0.6667
    >>> distinct_n(["4", "4"], 2)
    0.0
    """
    grams = [tuple(words[i:i + n]) for words in (t.split() for t in texts) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def mean_cosine_distance(vectors: np.ndarray) -> float:
    """Mean of 1 - cos over all pairs of rows of `vectors` [K, D]; 0.0 for fewer than two rows.

    >>> mean_cosine_distance(np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]]))  # pairs: 1, 0, 1
    0.6667
    """
    v = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)  # [K, D] unit rows
    i, j = np.triu_indices(len(v), k=1)
    return round(float(np.mean(1.0 - (v[i] * v[j]).sum(-1))), 4) if len(i) else 0.0


def diversity(groups: list[list[str]], encode) -> dict:
    """Per question (one list of completions each), distinct-1/2/3 and the mean pairwise cosine distance of the
    completions' embeddings (`encode`: texts -> [N, D]), each averaged over questions.

    >>> encode = lambda texts: np.array([[1.0, 0.0] if "a" in t else [0.0, 1.0] for t in texts])
    >>> diversity([["a b", "a b"], ["a b", "c d"]], encode)  # distinct-1: 2/4, 4/4; semantic: 0, 1
    {'distinct_1': 0.75, 'distinct_2': 0.75, 'distinct_3': 0.0, 'semantic': 0.5}
    """
    vectors = encode([text for group in groups for text in group])  # [sum of K, D]
    starts = np.cumsum([0] + [len(g) for g in groups])
    out = {f"distinct_{n}": float(np.mean([distinct_n(g, n) for g in groups])) for n in (1, 2, 3)}
    out["semantic"] = float(np.mean([mean_cosine_distance(vectors[a:b]) for a, b in zip(starts, starts[1:])]))
    return {k: round(v, 4) for k, v in out.items()}


# --- the aggregate file, its summary and plots ----------------------------------------------------------------


def read_result(folder: str) -> dict:
    path = os.path.join(folder, "result.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def read_aggregate(path: str) -> dict:
    """The aggregate file as it stands ({} if there is none)."""
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as e:
        raise SystemExit(f"{path} is not valid JSON ({e}): restore it (git checkout) or move it away; the grid "
                         "would otherwise overwrite the finished runs it records") from e


def write_aggregate(grid: Grid) -> dict:
    """bench/results/learn_grid_cpu.json rebuilt: the listed runs and bases from their folders' result.json, and
    every entry of the file as it stands that no folder of this invocation replaces, if finished (or its folder
    exists: in progress here, listed by another invocation); atomically. Returns what it wrote."""
    old = read_aggregate(grid.out)
    base, runs, kept = {}, {}, set()  # kept: the names of the entries carried over unchanged
    for kind, name, difficulty, cfg, fp in listed(grid):
        folder = os.path.join(grid.root, name)
        if os.path.exists(folder):  # a folder always wins
            entry = (base_entry(read_result(folder), fp) if kind == "base" else
                     run_entry(cfg, difficulty, read_result(folder), grid.long, fp))
        elif (entry := keep(old, kind, name, grid, listed=True)) is not None:
            kept.add(name)
        elif kind == "base":
            entry = base_entry({}, fp)  # not evaluated yet
        if kind == "base":
            base[difficulty] = entry
        elif entry is not None:
            runs[name] = entry
    unlisted = [("base", f"base-{d}") for d in old.get("base") or {} if d not in base]
    for kind, name in unlisted + [("run", name) for name in old.get("runs") or {} if name not in runs]:
        if (entry := keep(old, kind, name, grid, listed=False)) is not None:
            kept.add(name)
            if kind == "base":
                base[name.removeprefix("base-")] = entry
            else:
                runs[name] = entry
    runs = dict(sorted(runs.items(), key=lambda kv: canonical(kv[1])))
    settings = {d: {k: v for k, v in dataclasses.asdict(c).items() if k not in ("method", "seed", "out")}
                for d, c in grid.configs.items()}
    for d in sorted({*base, *(r["difficulty"] for r in runs.values())} - set(settings)):
        if d in (old.get("settings") or {}):
            settings[d] = old["settings"][d]
    results = {"date": time.strftime("%Y-%m-%d"), "commit": grid.commit, "command": grid.command,
               "hardware": {"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                            "gpu": learn.gpu_name(), "torch": torch.__version__,
                            "transformers": transformers.__version__, "python": platform.python_version()},
               "wall_s": round(time.perf_counter() - grid.started, 1),
               "held_out": {"limit": grid.limit, "split": f"the first {grid.limit} test problems under seed "
                            f"{EVAL_SEED}, few-shot picks under seed {EVAL_SEED}", "budgets": [short(grid), grid.long],
                            "diversity": grid.diversity},
               "settings": settings, "base": base, "runs": runs,
               "carried_over": {name: (old.get("carried_over") or {}).get(name, old.get("command"))
                                for name in sorted(kept)}}
    results["summary"] = summarize(results)
    results["plots"] = plot_paths(grid, list(settings))
    learn.write(results, grid.out)
    return results


def keep(old: dict, kind: str, name: str, grid: Grid, listed: bool) -> dict | None:
    """The entry of run (or base) `name` in the aggregate as it stands, to carry over unchanged when no folder of
    this invocation rebuilds it: if finished (a listed one with other settings too, until its new folder
    replaces it), or, unlisted, while its folder exists (in progress here under another invocation). None: drop it
    (nothing recorded, or only partly done with its folder gone: it starts over)."""
    entry = recorded(old, kind, name)
    if entry is None:
        return None
    if finished(entry, kind, old) or (not listed and os.path.exists(os.path.join(grid.root, name))):
        return entry
    return None


def canonical(run: dict) -> tuple:
    """Where a run's entry goes in the aggregate: the order of work of the whole grid (`order`)."""
    return (run["method"] not in FIRST, run["seed"], list(DIFFICULTIES).index(run["difficulty"]),
            METHODS.index(run["method"]))


def short(grid: Grid) -> int:
    """The training budget, at which every checkpoint is evaluated."""
    return next(iter(grid.configs.values())).max_new_tokens


def base_entry(result: dict, fp: dict) -> dict:
    """A base in the aggregate: its evaluations by budget, its diversity, and the settings that made them."""
    evals = {k.split("/")[1]: v for k, v in result.items() if k.startswith("eval/")}
    return {**evals, "diversity": result.get("diversity"), "fingerprint": fp}


def run_entry(cfg: Config, difficulty: str, result: dict, long: int, fp: dict) -> dict:
    """One run in the aggregate: what result.json holds so far, the collapse warnings and per-step metrics, and
    the settings that made them (`fingerprint`, as its result.json's)."""
    rows = meter.read_jsonl(os.path.join(cfg.out, "metrics.jsonl"))
    trained = result.get("train", {})
    curve = {s: result[f"eval/{cfg.max_new_tokens}/{s}"] for s in checkpoint_steps(cfg)
             if f"eval/{cfg.max_new_tokens}/{s}" in result}
    entry = {"method": cfg.method, "seed": cfg.seed, "difficulty": difficulty, "folder": os.path.basename(cfg.out),
             **{k: trained.get(k) for k in ("commit", "shared_cpu", "threads", "steps_done", "train_seconds",
                                            "seconds_per_step", "held_out_seen")},
             "curve": {str(s): m for s, m in curve.items()}}
    if len(curve) == len(checkpoint_steps(cfg)):
        best, last = evaluate.best_and_last(curve)
        for name, step in (("last", last), ("best", best)):
            entry[name] = {"step": step, **{str(b): result.get(f"eval/{b}/{step}")
                                           for b in (cfg.max_new_tokens, long)}}
    return {**entry, "diversity": result.get("diversity"), "warnings": learn.warnings_tripped(rows), "metrics": rows,
            "fingerprint": fp}


METRICS = ("extractive_match", "exact_match")


def spread(values: list[float]) -> dict | None:
    """Mean, min and max (rounded) and how many; None for no values.

    >>> spread([0.5, 0.25, 0.75])
    {'mean': 0.5, 'min': 0.25, 'max': 0.75, 'n': 3}
    """
    if not values:
        return None
    return {"mean": round(sum(values) / len(values), 4), "min": round(min(values), 4), "max": round(max(values), 4),
            "n": len(values)}


def accuracy(run: dict, slot: str, budget: str, metric: str) -> float | None:
    """A run's held-out `metric` for its `slot` checkpoint ("last" or "best") at `budget`, None if not yet known."""
    evaluation = (run.get(slot) or {}).get(budget)
    return None if evaluation is None else evaluation[metric]


def summarize(results: dict) -> dict:
    """Per difficulty and method, over seeds: held-out accuracy of the last and the best checkpoint at both budgets
    (mean, min, max), each method's difference to r1 of the same seed, seed by seed, and seconds per step.

    >>> run = lambda m, s, x: {"difficulty": "easy", "method": m, "seed": s, "seconds_per_step": 60.0,
    ...                        "last": {"96": {"extractive_match": x, "exact_match": x}}}
    >>> results = {"held_out": {"budgets": [96]}, "runs": {"a": run("r1", 0, 0.5), "b": run("memory-r+", 0, 0.75),
    ...                                                     "c": run("r1", 1, 0.25), "d": run("memory-r+", 1, 0.25)}}
    >>> s = summarize(results)["easy"]["memory-r+"]
    >>> s["last@96"]["extractive_match"]
    {'mean': 0.5, 'min': 0.25, 'max': 0.75, 'n': 2, 'vs_r1': {'0': 0.25, '1': 0.0}, 'vs_r1_mean': 0.125}
    >>> s["best@96"]["exact_match"], s["seconds_per_step"]["mean"]
    (None, 60.0)
    """
    groups: dict[str, dict[str, dict[int, dict]]] = {}
    for run in results["runs"].values():
        groups.setdefault(run["difficulty"], {}).setdefault(run["method"], {})[run["seed"]] = run
    summary: dict = {}
    for d, methods in groups.items():
        for m, by_seed in methods.items():
            entry = {"seeds": sorted(by_seed), "seconds_per_step": spread(
                [r["seconds_per_step"] for r in by_seed.values() if r.get("seconds_per_step") is not None])}
            for slot in ("last", "best"):
                for budget in map(str, results["held_out"]["budgets"]):
                    entry[f"{slot}@{budget}"] = {metric: compare(by_seed, methods.get("r1", {}), slot, budget, metric,
                                                                 m != "r1") for metric in METRICS}
            summary.setdefault(d, {})[m] = entry
    return summary


def compare(by_seed: dict, r1: dict, slot: str, budget: str, metric: str, paired: bool) -> dict | None:
    """`spread` over seeds, with the seed-by-seed difference to r1 (where both are known) when `paired`."""
    values = {s: accuracy(r, slot, budget, metric) for s, r in by_seed.items()}
    values = {s: v for s, v in values.items() if v is not None}
    out = spread(list(values.values()))
    if out is None or not paired:
        return out
    ref = {s: accuracy(r, slot, budget, metric) for s, r in r1.items()}
    diff = {str(s): round(v - ref[s], 4) for s, v in sorted(values.items()) if ref.get(s) is not None}
    return {**out, "vs_r1": diff, "vs_r1_mean": round(sum(diff.values()) / len(diff), 4) if diff else None}


def format_summary(results: dict) -> str:
    """The summary as text, accuracies in %: per difficulty the base, then per method and checkpoint slot the
    mean [min-max] over seeds and the difference to r1 seed by seed."""
    budgets = [str(b) for b in results["held_out"]["budgets"]]
    lines = []
    for d, methods in results["summary"].items():
        base = results["base"].get(d) or {}
        known = [f"{100 * base[b]['extractive_match']:.1f} / {100 * base[b]['exact_match']:.1f} at {b} tokens"
                 for b in budgets if base.get(b)]
        lines.append(f"{d}: held-out extractive / exact %; base {', '.join(known) or 'not evaluated yet'}")
        for m, entry in methods.items():
            cost = "?" if entry["seconds_per_step"] is None else f"{entry['seconds_per_step']['mean']:.0f}"
            lines.append(f"  {m} (seeds {', '.join(map(str, entry['seeds']))}; {cost} s/step)")
            for slot in [f"{s}@{b}" for s in ("last", "best") for b in budgets]:
                cells = [cell(name, entry[slot][metric]) for metric, name in zip(METRICS, ("extractive", "exact"))
                         if entry[slot][metric]]
                if cells:
                    lines.append(f"    {slot:9} " + "  ".join(cells))
    return "\n".join(lines)


def cell(name: str, value: dict) -> str:
    """One metric of a summary slot, in %.

    >>> cell("exact", {"mean": 0.5, "min": 0.25, "max": 0.75, "n": 2, "vs_r1": {"0": 0.25, "1": -0.1}})
    'exact 50.0 [25.0-75.0] vs r1 s0 +25.0 s1 -10.0'
    """
    text = f"{name} {100 * value['mean']:.1f} [{100 * value['min']:.1f}-{100 * value['max']:.1f}]"
    if value.get("vs_r1"):
        text += " vs r1 " + " ".join(f"s{s} {100 * d:+.1f}" for s, d in value["vs_r1"].items())
    return text


def plot_paths(grid: Grid, difficulties: list[str]) -> list[str]:
    """The curve plots, one per difficulty, beside the aggregate file (named relative to bench/, as learn.py's)."""
    if not plots.available():
        return []
    folder = os.path.splitext(grid.out)[0]
    return [os.path.relpath(os.path.join(folder, f"curves-{d}.png"), learn.HERE) for d in difficulties]


def plot(grid: Grid, results: dict) -> None:
    """Per difficulty, held-out accuracy at each checkpoint (the base model at step 0) at the training budget: one
    line per run, coloured per method, styled per seed; the base as a grey line."""
    if not plots.available():
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for d, path in zip(results["settings"], plot_paths(grid, list(results["settings"]))):
        budget = str(results["settings"][d]["max_new_tokens"])  # the training budget of the difficulty's runs
        base = (results["base"].get(d) or {}).get(budget)
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), squeeze=False)
        for ax, metric in zip(axes.flat, METRICS):
            for run in (r for r in results["runs"].values() if r["difficulty"] == d and r["curve"]):
                points = ([(0, base[metric])] if base else []) + sorted(
                    (int(s), m[metric]) for s, m in run["curve"].items())
                ax.plot([p[0] for p in points], [100 * p[1] for p in points], plots.STYLES[run["seed"] % 4],
                        marker="o", color=f"C{METHODS.index(run['method'])}", label=f"{run['method']} s{run['seed']}")
            if base:
                ax.axhline(100 * base[metric], color="grey", linewidth=0.8, label="base")
            ax.set_title(f"{metric.replace('_', ' ')} %, {budget} new tokens", fontsize=10)
            ax.set_xlabel("step", fontsize=8)
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        fig.suptitle(f"arith {d}: held-out accuracy at each checkpoint (step 0: the base model)", fontsize=11)
        fig.tight_layout()
        os.makedirs(os.path.dirname(os.path.join(learn.HERE, path)), exist_ok=True)
        fig.savefig(os.path.join(learn.HERE, path), dpi=90)
        plt.close(fig)
