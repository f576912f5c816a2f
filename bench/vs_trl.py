"""tinyrl vs TRL GRPOTrainer, side by side: the same model, prompts, P, G, lengths, seed and CPU threads, run
alternately in one invocation. Writes bench/results/vs_trl.json (--device cuda: vs_trl_gpu.json).

    python bench/vs_trl.py              # 2 rounds x 4 steps per tool, ~10 min on 2 quiet cores
    python bench/vs_trl.py --smoke      # 1 round x 2 steps: checks both paths work
    python bench/vs_trl.py --model PATH --rounds 3 --steps 5
    python bench/vs_trl.py --device cuda --model PATH --prompts 8 --group 16 --new-tokens 200 --steps 3 --rounds 1
    python bench/vs_trl.py --dtype bf16  # both tools with bf16 base weights on CPU (fast on avx512_bf16/AMX CPUs)
    python bench/vs_trl.py --merge trl.json --out bench/results/vs_trl_gpu.json  # add a run made alone with
        # `--child trl --result trl.json` (same settings, same machine) to a results file that skipped it

Needs TRL (the `bench` extra: `pip install --no-deps trl` next to an existing torch) and GSM8K train at
../shared/data/gsm8k/train.jsonl (or --data). The peer follows ../shared/docs/measured.md: TRL + peft LoRA r=16
alpha=32 on q,k,v,o,gate,up,down, HF `generate` (no vLLM), loss_type "grpo", beta 0.04 (adapter-disabled
reference), AdamW lr 5e-6 (0.9, 0.99) wd 0.1, clip 0.1, gradient checkpointing, fp32 (bf16=False), temperature
0.9, top-p 1, P=2 prompts x G=4 completions per optimizer step (per_device_train_batch_size = P*G, accumulation 1),
exactly 64 new tokens for both (min_new_tokens = max_new_tokens: sampling differs between tools, so equal work is
forced). TRL gets the exact prompts tinyrl draws (tinyrl's seeded per-epoch shuffle, fed to TRL in order with
shuffle_dataset=False), the same XML system prompt and chat template, and tinyrl's r1 task rewards wrapped as TRL
reward functions.

Each run is its own subprocess (`--child tinyrl|trl`), so peak RSS is per tool; tools alternate (tinyrl, TRL,
tinyrl, TRL, ...) so drift in machine speed hits both. Step 1 of each run is warm-up and is not counted.
Reported per run: median s/step over steps 2..N, median generation seconds and tokens/s (P*G*64 new tokens over
the time spent in generate), and peak RSS (the max of VmHWM sampled every 50 ms, at every tinyrl phase and at
exit: tinyrl resets VmHWM per phase to meter it, so the exit value alone would miss earlier peaks).

--device cuda: bf16 weights for both (LoRA, checkpointing and the rest as above), and both split the step's P*G
completions into micro-batches of 8 rows for the forward/backward passes (tinyrl: micro_batch 8, logprob_chunk 4;
TRL: per_device_train_batch_size 8 with gradient_accumulation_steps P*G/8), while still generating all P*G at once
(tinyrl: gen_batch P*G; TRL: generation_batch_size P*G) and taking one optimizer step per P prompts. Also reported:
each child's whole-run CUDA peak (max_memory_allocated / max_memory_reserved; tinyrl resets CUDA's peak counters
per phase, so every reset first folds them into a running max). Children stream their progress lines
(--verbose, on by default on cuda), the JSON is rewritten after every run (a failed run records its error), and
--time-limit stops starting new runs once that many seconds have passed.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import torch

from hardware import cpu_name

from tinyrl.meter import peak_bytes

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
OUT = {"cpu": os.path.join(HERE, "results", "vs_trl.json"), "cuda": os.path.join(HERE, "results", "vs_trl_gpu.json")}
DEFAULT_DATA = os.path.join(ROOT, "..", "shared", "data", "gsm8k")

# The shared geometry (both tools get these); --prompts, --group and --new-tokens rebind P, G and NEW_TOKENS.
P, G, NEW_TOKENS, THREADS, SEED = 2, 4, 64, 2, 0
DTYPE = "fp32"  # --dtype rebinds it: both tools load the base in it (default fp32 on CPU, bf16 on cuda)
GPU_MICRO_BATCH = 8  # rows per forward/backward on cuda (CPU: the whole step, P*G rows)
# TRL 1.16 never truncates prompts, so tinyrl's cap sits above any GSM8K prompt (950 tokens with a character-level
# tokenizer such as bench/randmodel.py's; well under 256 with BPE ones): both tools see whole prompts.
MAX_PROMPT_TOKENS = 1024
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOOLS = ("tinyrl", "trl")


def shared_settings(device: str) -> dict:
    """The geometry and optimisation settings both tools get."""
    out = {"prompts_per_step": P, "group_size": G, "max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS,
           "temperature": 0.9, "top_p": 1.0, "top_k": 0, "lora_rank": 16, "lora_alpha": 32, "lora_dropout": 0.0,
           "lora_targets": "q,k,v,o,gate,up,down", "grad_checkpointing": True,
           "dtype": DTYPE, "kl_beta": 0.04, "loss_type": "grpo", "lr": 5e-6,
           "adam_betas": [0.9, 0.99], "weight_decay": 0.1, "max_grad_norm": 0.1,
           "lr_schedule": "10% linear warm-up, cosine", "rewards": "tinyrl r1 task rewards (xml_count, "
           "soft_format, strict_format, integer, correctness; exact match)", "threads": THREADS, "seed": SEED,
           "task": "gsm8k train, the prompts tinyrl draws (seeded per-epoch shuffle), XML system prompt"}
    if device == "cuda":
        out.update(device="cuda", max_prompt_tokens=MAX_PROMPT_TOKENS, batching=batching(device))
    return out


def batching(device: str) -> dict:
    """How each tool splits a step: all P*G completions generated in one batch, one optimizer step per P prompts,
    forward/backward over `rows` rows at a time. TRL derives steps_per_generation = generation_batch_size /
    per_device_train_batch_size = gradient_accumulation_steps, so it generates once per optimizer step."""
    rows = P * G if device == "cpu" else GPU_MICRO_BATCH
    return {"tinyrl": {"gen_batch": P * G, "micro_batch": rows, "logprob_chunk": 4},
            "trl": {"generation_batch_size": P * G, "per_device_train_batch_size": rows,
                    "gradient_accumulation_steps": P * G // rows}}


# --- shared helpers --------------------------------------------------------------------------------


def vm_hwm() -> int:
    """Peak RSS (VmHWM) of this process in bytes; 0 where /proc is missing."""
    return peak_bytes(torch.device("cpu"))


class PeakRSS:
    """Samples VmHWM every `every` seconds on a daemon thread and keeps the largest value seen."""

    def __init__(self, every: float = 0.05):
        self.peak, self.every = vm_hwm(), every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.peak = max(self.peak, vm_hwm())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, vm_hwm())
        return self.peak


class CudaPeak:
    """Whole-run CUDA peaks of this process. tinyrl's meter resets CUDA's peak counters at every phase, so
    torch.cuda.reset_peak_memory_stats is wrapped to fold the counters into a running max before each reset."""

    def __init__(self):
        import torch

        self.allocated = self.reserved = 0
        reset = torch.cuda.reset_peak_memory_stats

        def folding_reset(device=None):
            self.fold()
            reset(device)

        torch.cuda.reset_peak_memory_stats = folding_reset

    def fold(self) -> dict:
        import torch

        self.allocated = max(self.allocated, torch.cuda.max_memory_allocated())
        self.reserved = max(self.reserved, torch.cuda.max_memory_reserved())
        return {"cuda_peak_allocated_bytes": self.allocated, "cuda_peak_reserved_bytes": self.reserved,
                "gpu": torch.cuda.get_device_name()}


def write_json_atomic(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def tinyrl_prompts(data: str, steps: int):
    """The P examples of each step exactly as tinyrl's loop draws them: [steps][P] Examples."""
    from tinyrl.tasks import examples_for_step, load_task

    train = load_task("gsm8k", data, "train", SEED, None)
    return [examples_for_step(train, s, P, SEED) for s in range(steps)]


def step_summary(step_s: list[float], gen_s: list[float]) -> dict:
    """Median over steps 2..N (step 1 is warm-up)."""
    counted_step, counted_gen = step_s[1:] or step_s, gen_s[1:] or gen_s
    gen = statistics.median(counted_gen)
    return {"median_step_s": round(statistics.median(counted_step), 3), "median_generate_s": round(gen, 3),
            "median_rest_s": round(statistics.median(s - g for s, g in zip(counted_step, counted_gen)), 3),
            "gen_tokens_per_s": round(P * G * NEW_TOKENS / gen, 2), "step_s": [round(x, 3) for x in step_s],
            "generate_s": [round(x, 3) for x in gen_s]}


# --- child: tinyrl ---------------------------------------------------------------------------------


def child_tinyrl(model: str, data: str, steps: int, device: str) -> dict:
    import torch

    from tinyrl import loop
    from tinyrl.config import Config

    torch.set_num_threads(THREADS)
    monitor = PeakRSS()
    cuda = CudaPeak() if device == "cuda" else None
    root = tempfile.mkdtemp(prefix="vs-trl-tinyrl-")
    cfg = Config(task="gsm8k", data=data, model=model, out=os.path.join(root, "run"), method="r1", steps=steps,
                 seed=SEED, prompts_per_step=P, group_size=G, **batching(device)["tinyrl"],
                 max_prompt_tokens=MAX_PROMPT_TOKENS, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                 temperature=0.9, top_p=1.0, lr=5e-6, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.99,
                 warmup_ratio=0.1, max_grad_norm=0.1, kl_beta=0.04, quant="none",
                 dtype=DTYPE, lora_rank=16, lora_alpha=32, grad_checkpointing=True,
                 device=device, threads=THREADS, save_every=10**6, sample_every=10**6)
    started = time.perf_counter()
    run = loop.fit(cfg)  # prints a line per step (the parent shows them with --verbose)
    wall = time.perf_counter() - started
    with open(os.path.join(run, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    shutil.rmtree(root, ignore_errors=True)
    peak = monitor.stop()
    if device == "cpu":  # the per-phase peaks are RSS on CPU (on cuda they are CUDA bytes: see CudaPeak)
        peak = max(peak, max(max(r.get("mem/generate", 0), r.get("mem/train", 0), r.get("mem/score", 0))
                             for r in rows))
    out = step_summary([r["time/step"] for r in rows], [r["time/generate"] for r in rows])
    for phase in ("score", "train"):  # the rest of tinyrl's step, phase by phase (TRL's is not split)
        out[f"median_{phase}_s"] = round(statistics.median([r[f"time/{phase}"] for r in rows][1:] or [0.0]), 3)
    out.update({"tool": "tinyrl", "steps": len(rows), "wall_s": round(wall, 1), "peak_rss_bytes": peak,
                "completion_len_mean": statistics.mean(r["len/mean"] for r in rows),
                "reward_mean": statistics.mean(r["reward/total"] for r in rows),
                "questions": [ex.question[:60] for step in tinyrl_prompts(data, steps) for ex in step]})
    if cuda:
        out.update(cuda.fold(), oom_backoffs=rows[-1]["oom/backoffs"],
                   groups_frac_zero_var=statistics.mean(r["groups/frac_zero_var"] for r in rows))
    return out


# --- child: TRL ------------------------------------------------------------------------------------


def reward_funcs():
    """tinyrl's r1 task rewards as TRL reward functions (tinyrl.trl: TRL's contract, conversational completions)."""
    from tinyrl.trl import MemoryRewardFunctions

    return MemoryRewardFunctions(method="r1").reward_funcs()


def child_trl(model: str, data: str, steps: int, device: str, flush_denormal: bool = False) -> dict:
    import torch
    import transformers
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from tinyrl import policy, prompts

    torch.set_num_threads(THREADS)
    monitor = PeakRSS()
    cuda = CudaPeak() if device == "cuda" else None
    sync = torch.cuda.synchronize if cuda else (lambda: None)  # CUDA runs ahead of the host: time finished work
    batches = tinyrl_prompts(data, steps)
    rows = [{"prompt": [{"role": "system", "content": prompts.SYSTEM_PROMPT},
                        {"role": "user", "content": ex.question}], "answer": ex.answer}
            for batch in batches for ex in batch]  # file order = tinyrl's draw order; TRL does not shuffle
    dataset = Dataset.from_list(rows)

    # The prompt tokens tinyrl would feed the model, to check TRL renders the same ones.
    tokenizer = policy.load_tokenizer(model)
    ours = prompts.render(list(batches[0]), tokenizer, MAX_PROMPT_TOKENS, system_prompt=prompts.SYSTEM_PROMPT)
    ours_ids = [row[mask.bool()].tolist() for row, mask in zip(ours.input_ids, ours.attention_mask)]

    root = tempfile.mkdtemp(prefix="vs-trl-trl-")
    args = GRPOConfig(
        output_dir=root, max_steps=steps, seed=SEED, **batching(device)["trl"], num_generations=G,
        max_completion_length=NEW_TOKENS, generation_kwargs={"min_new_tokens": NEW_TOKENS}, temperature=0.9,
        top_p=1.0, top_k=0, beta=0.04, loss_type="grpo", learning_rate=5e-6, adam_beta1=0.9, adam_beta2=0.99,
        weight_decay=0.1, max_grad_norm=0.1, lr_scheduler_type="cosine", warmup_steps=0.1,
        gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}, bf16=DTYPE == "bf16",
        fp16=False, use_cpu=device == "cpu", shuffle_dataset=False,
        model_init_kwargs={"dtype": torch.float32 if DTYPE == "fp32" else torch.bfloat16}, logging_steps=1,
        save_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=model, reward_funcs=reward_funcs(), args=args, train_dataset=dataset,
                          processing_class=tokenizer, peft_config=lora)

    step_s: list[float] = []
    gen_s: list[float] = []
    seen: dict = {"lengths": [], "prompt_ids": None}
    generate = trainer._generate_single_turn  # HF generate path (no vLLM): padding + model.generate

    def timed_generate(prompt_ids, *a, **kw):
        if seen["prompt_ids"] is None:
            seen["prompt_ids"] = [list(p) for p in prompt_ids]
        sync()
        t0 = time.perf_counter()
        completion_ids, logprobs = generate(prompt_ids, *a, **kw)
        sync()
        gen_s.append(time.perf_counter() - t0)
        seen["lengths"].extend(len(c) for c in completion_ids)
        return completion_ids, logprobs

    trainer._generate_single_turn = timed_generate

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            sync()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            sync()
            step_s.append(time.perf_counter() - self.t0)
            generated = f" (generate {gen_s[-1]:.1f} s)" if gen_s else ""
            print(f"trl step {state.global_step}/{steps}: {step_s[-1]:.1f} s{generated}", flush=True)

    trainer.add_callback(StepTimer())
    if flush_denormal:  # what tinyrl's policy.load_policy does on CPU; off by default (TRL as shipped)
        torch.set_flush_denormal(True)
    print(f"trl: training {steps} steps on {trainer.args.device}", flush=True)
    started = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - started
    shutil.rmtree(root, ignore_errors=True)
    logged = trainer.state.log_history
    rewards_logged = [h["reward"] for h in logged if "reward" in h]
    out = step_summary(step_s, gen_s)
    # TRL's prompts repeat each question G times in a generation batch; compare one row per question.
    trl_ids = seen["prompt_ids"][::G] if seen["prompt_ids"] else []
    out.update({"tool": "trl", "steps": len(step_s), "wall_s": round(wall, 1), "peak_rss_bytes": monitor.stop(),
                "completion_len_mean": statistics.mean(seen["lengths"]) if seen["lengths"] else None,
                "reward_mean": statistics.mean(rewards_logged) if rewards_logged else None,
                "prompt_tokens_match_tinyrl": trl_ids == ours_ids,
                "questions": [r["prompt"][1]["content"][:60] for r in rows],
                "versions": {"trl": __import__("trl").__version__, "transformers": transformers.__version__}})
    if cuda:
        zero_std = [h["frac_reward_zero_std"] for h in logged if "frac_reward_zero_std" in h]
        out.update(cuda.fold(), steps_per_generation=trainer.args.steps_per_generation,
                   groups_frac_zero_var=statistics.mean(zero_std) if zero_std else None,
                   triton=importlib.util.find_spec("triton") is not None)
    return out


# --- parent ----------------------------------------------------------------------------------------

# What the summary compares: name -> (key in a run row, scale); the CUDA peaks only on cuda.
METRICS = {"s_per_step": ("median_step_s", 1), "generate_s": ("median_generate_s", 1),
           "rest_s": ("median_rest_s", 1), "gen_tokens_per_s": ("gen_tokens_per_s", 1),
           "peak_rss_gib": ("peak_rss_bytes", 1 / 2**30)}
CUDA_METRICS = {"cuda_allocated_gib": ("cuda_peak_allocated_bytes", 1 / 2**30),
                "cuda_reserved_gib": ("cuda_peak_reserved_bytes", 1 / 2**30)}
LABELS = {"s_per_step": "s/step", "generate_s": "generate s/step", "rest_s": "rest s/step",
          "gen_tokens_per_s": "gen tokens/s", "peak_rss_gib": "peak RSS GiB", "cuda_allocated_gib": "CUDA alloc GiB",
          "cuda_reserved_gib": "CUDA reserved GiB"}


def run_child(tool: str, model: str, data: str, steps: int, extra: list[str], echo: bool) -> dict:
    """One run in its own process: its result row, or {tool, error, log_tail} if it fails. `echo` shows the
    child's output lines as they come."""
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), MKL_NUM_THREADS=str(THREADS), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    fd, result = tempfile.mkstemp(prefix=f"vs-trl-{tool}-", suffix=".json")
    os.close(fd)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", tool, "--model", model, "--data", data,
           "--steps", str(steps), "--result", result, *extra]
    tail: collections.deque[str] = collections.deque(maxlen=300)
    started = time.perf_counter()
    try:
        with subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              errors="replace") as proc:
            for line in proc.stdout:
                tail.append(line)
                if echo:
                    print(f"    {tool}| {line}", end="", flush=True)
        if proc.returncode == 0:
            with open(result) as f:
                out = json.load(f)
        else:
            log = "".join(tail)
            if not echo:
                sys.stderr.write(log[-12000:])
            last = next((line.strip() for line in reversed(tail) if line.strip()), "no output")
            out = {"tool": tool, "error": f"exit {proc.returncode}: {last}", "log_tail": log[-4000:]}
    finally:
        os.unlink(result)
    out["process_wall_s"] = round(time.perf_counter() - started, 1)
    return out


def spread(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
            "max": round(max(values), 3)}


def render_table(summary: dict, ratios: dict) -> str:
    """Median (min-max over runs) per tool and the ratio of medians tinyrl/TRL [per round]."""

    def cell(s: dict) -> str:
        return f"{s['median']:.2f}" if s["min"] == s["max"] else f"{s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f})"

    header = f"{'':17}{'tinyrl':>22}{'TRL':>22}   tinyrl/TRL [per round]"
    lines = [header, "-" * len(header)]
    for name, q in ratios.items():
        rounds = ", ".join(f"{x:.2f}" for x in q["per_round"])
        lines.append(f"{LABELS[name]:17}{cell(summary['tinyrl'][name]):>22}{cell(summary['trl'][name]):>22}   "
                     f"{q['of_medians']:.2f} [{rounds}]")
    return "\n".join(lines)


def merge(out_path: str, child_path: str) -> int:
    """Add a run that `--child TOOL --result FILE` wrote on the same machine, with the same settings, to a results
    file whose invocation skipped it (its --time-limit passed): the device time ran out before the pair finished."""
    global P, G, NEW_TOKENS, DTYPE
    with open(out_path) as f:
        old = json.load(f)
    with open(child_path) as f:
        row = json.load(f)
    c = old["config"]
    P, G, NEW_TOKENS, DTYPE = c["prompts_per_step"], c["group_size"], c["max_new_tokens"], c["dtype"]
    if "error" in row:
        raise SystemExit(f"--merge {child_path}: that run failed ({row['error'][:200]}); nothing to add")
    same = {"completion length": row.get("completion_len_mean") == NEW_TOKENS,
            "prompts per step": len(row.get("questions", [])) == P * row.get("steps", 0),
            "device": row.get("gpu") == old["hardware"].get("gpu")}
    if row["tool"] == "trl":
        same["prompt tokens"] = bool(row.get("prompt_tokens_match_tinyrl"))
    if not all(same.values()):
        raise SystemExit(f"--merge {child_path}: not the same settings as {out_path} "
                         f"({', '.join(k for k, v in same.items() if not v)})")
    runs = old["runs"]
    taken = {r["round"] for r in runs if r["tool"] == row["tool"]}
    row["round"] = min({r["round"] for r in runs} - taken, default=max(taken, default=0) + 1)
    row["peak_rss_gib"] = round(row["peak_rss_bytes"] / 2**30, 3)
    row["merged_from"] = os.path.basename(child_path)
    keep = ("hardware", "date", "command", "trl_flush_denormal", "MALLOC_MMAP_THRESHOLD_", "model", "data", "config",
            "counted", "time_limit_s", "skipped")
    head = {k: old[k] for k in keep if k in old}
    head["skipped"] = [s for s in head.get("skipped", []) if s != f"round {row['round']} {row['tool']}"]
    head["merged"] = (f"round {row['round']} {row['tool']}: run alone afterwards on the same machine (bench/vs_trl.py "
                      f"--child {row['tool']} with the same settings) and added by --merge")
    device = "cuda" if old["hardware"].get("gpu") else "cpu"
    results = report(head, runs + [row], time.perf_counter() - old["wall_s"] - row.get("wall_s", 0), device,
                     old.get("trl_flush_denormal", False))
    write_json_atomic(out_path, results)
    print(results["table"] or "no pair of runs yet")
    print(f"wrote {out_path}")
    return 0


def report(head: dict, runs: list[dict], started: float, device: str, trl_flush_denormal: bool) -> dict:
    """The results JSON from the runs so far (failed runs carry an error and are left out of the summary)."""
    ok = [r for r in runs if "error" not in r]
    by_tool = {t: [r for r in ok if r["tool"] == t] for t in TOOLS}
    results = dict(head)
    if device == "cuda":
        results["hardware"] = dict(head["hardware"], gpu=next((r["gpu"] for r in ok), None))
    results["runs"] = [{k: v for k, v in r.items() if k != "questions"} for r in runs]
    results["wall_s"] = round(time.perf_counter() - started, 1)
    results["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    asked = [r["questions"] for r in ok if "questions" in r]  # runs merged from a saved file have none
    results["same_prompts"] = all(q == asked[0] for q in asked) if ok and len(asked) == len(ok) else None
    results["prompt_tokens_match"] = (all(r.get("prompt_tokens_match_tinyrl") for r in by_tool["trl"])
                                      if by_tool["trl"] else None)
    metrics = dict(METRICS, **(CUDA_METRICS if device == "cuda" else {}))
    summary = {t: {name: spread([r[key] * scale for r in by_tool[t]]) for name, (key, scale) in metrics.items()}
               for t in TOOLS if by_tool[t]}
    ratios = {}
    if len(summary) == 2:
        rounds = {t: {r["round"]: r for r in by_tool[t]} for t in TOOLS}
        both = sorted(rounds["tinyrl"].keys() & rounds["trl"].keys())
        paired = [(rounds["tinyrl"][n], rounds["trl"][n]) for n in both]
        for name, (key, _) in metrics.items():  # tinyrl / TRL
            medians = summary["tinyrl"][name]["median"], summary["trl"][name]["median"]
            ratios[name] = {"of_medians": round(medians[0] / medians[1], 3),
                            "per_round": [round(t[key] / p[key], 3) for t, p in paired]}
    results["summary"] = summary
    results["ratios_tinyrl_over_trl"] = ratios
    if DTYPE == "fp32":
        numerics = ("tinyrl sets torch.set_flush_denormal(True) on CPU; TRL runs with PyTorch's default"
                    + (" (this run: TRL also flushes, --trl-flush-denormal)" if trl_flush_denormal else ""))
        head_note = ("TRL's LM head scores every position of prompt+completion and computes entropy; tinyrl "
                     "scores completion tokens only (this is part of what is being compared)")
    else:
        numerics = ("precision: both load bf16 base weights and keep the LoRA weights fp32 (PEFT's "
                    "autocast_adapter_dtype); TRL trains under bf16 autocast (bf16=True), tinyrl without autocast, "
                    "with an fp32 log-softmax over completion logits")
        head_note = ("TRL's fused LM head (trl/kernels/chunked_logprob.py) scores completion positions only where "
                     "Triton is present (every position otherwise; on cuda see 'triton' in its run rows) and computes "
                     "entropy; tinyrl scores completion tokens only (this is part of what is being compared)")
    results["not_like_for_like"] = [
        f"sampling differs (different RNG use); equal work is forced with min_new_tokens = max_new_tokens = "
        f"{NEW_TOKENS}",
        numerics,
        head_note,
        "TRL generate time is _generate_single_turn (padding + model.generate); tinyrl's is policy.generate "
        "(also decodes); the rest of each step (reference pass, rewards, loss, backward, optimizer) is 'rest'",
    ]
    if device == "cuda":
        results["notes"] = [
            "batching: config.batching, as passed to each tool; TRL's derived steps_per_generation is in its run rows",
            "CUDA peaks: torch.cuda.max_memory_allocated / max_memory_reserved of each child over its whole run "
            "(model load included), folded across tinyrl's per-phase peak resets",
            "rewards: groups whose rewards are all equal (groups_frac_zero_var per run; nearly all on a random-init "
            "model) get zero advantages; neither tool skips work for them (tinyrl's train_step and TRL's "
            "_compute_loss run every forward and backward), so the timings stay comparable and no tie-break reward "
            "is added",
        ]
    results["table"] = render_table(summary, ratios) if ratios else None
    return results


def main() -> int:
    global P, G, NEW_TOKENS, DTYPE
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model folder (default: the offline smollm2-135m copy)")
    ap.add_argument("--data", default=DEFAULT_DATA, help="GSM8K folder with train.jsonl (default ../shared/data/gsm8k)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="cuda: bf16, micro-batches of 8 rows, whole-run CUDA peaks (default cpu)")
    ap.add_argument("--prompts", type=int, default=P, help="P: prompts per optimizer step (default %(default)s)")
    ap.add_argument("--group", type=int, default=G, help="G: completions per prompt (default %(default)s)")
    ap.add_argument("--new-tokens", type=int, default=NEW_TOKENS,
                    help="new tokens per completion, forced: min = max (default %(default)s)")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default=None,
                    help="base weights of both tools (default fp32 on cpu, bf16 on cuda; LoRA stays fp32)")
    ap.add_argument("--rounds", type=int, default=2, help="alternating tinyrl/TRL pairs")
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps per run (step 1 is warm-up)")
    ap.add_argument("--smoke", action="store_true", help="1 round of 2 steps: both paths work")
    ap.add_argument("--out", default=None,
                    help="results JSON (default bench/results/vs_trl.json; --device cuda: vs_trl_gpu.json)")
    ap.add_argument("--time-limit", type=float, default=None,
                    help="start no new run once this many seconds have passed (the JSON keeps what finished)")
    ap.add_argument("--verbose", action="store_true", help="show each run's output as it comes (default on cuda)")
    ap.add_argument("--trl-flush-denormal", action="store_true",
                    help="diagnostic: give TRL tinyrl's torch.set_flush_denormal(True) (off: TRL as shipped)")
    ap.add_argument("--merge", metavar="CHILD_JSON", help="add a run written by --child TOOL --result CHILD_JSON "
                    "(same machine and settings) to the results file --out, and re-derive the ratios")
    ap.add_argument("--child", choices=TOOLS, help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    a = ap.parse_args()
    P, G, NEW_TOKENS = a.prompts, a.group, a.new_tokens
    DTYPE = a.dtype or ("fp32" if a.device == "cpu" else "bf16")

    if a.child:
        if a.child == "tinyrl":
            out = child_tinyrl(a.model, a.data, a.steps, a.device)
        else:
            out = child_trl(a.model, a.data, a.steps, a.device, flush_denormal=a.trl_flush_denormal)
        write_json_atomic(a.result, out)
        return 0

    if a.merge:
        if not a.out:
            raise SystemExit("--merge needs --out: the results file to add the run to")
        return merge(a.out, a.merge)
    if a.smoke:
        a.rounds, a.steps = 1, 2
        if a.out is None:  # a smoke run never overwrites the real result
            a.out = os.path.join(tempfile.gettempdir(), "vs_trl_smoke.json" if a.device == "cpu" else
                                 "vs_trl_gpu_smoke.json")
    default_out = OUT[a.device] if DTYPE == ("fp32" if a.device == "cpu" else "bf16") else \
        os.path.join(HERE, "results", f"vs_trl_{a.device}_{DTYPE}.json")
    out_path = os.path.abspath(a.out or default_out)
    if a.steps < 2:
        raise SystemExit("--steps must be at least 2 (step 1 is warm-up and not counted)")
    if P < 1 or G < 2 or NEW_TOKENS < 1:
        raise SystemExit("--prompts must be at least 1, --group at least 2 and --new-tokens at least 1")
    if a.device == "cuda" and P * G % GPU_MICRO_BATCH:
        raise SystemExit(f"--device cuda needs prompts x group ({P * G}) divisible by {GPU_MICRO_BATCH}, the "
                         "micro-batch of both tools")
    data = os.path.abspath(a.data)
    if not os.path.isfile(os.path.join(data, "train.jsonl")):
        raise SystemExit(f"GSM8K train data not found: {os.path.join(data, 'train.jsonl')} (pass --data FOLDER "
                         "holding train.jsonl with GSM8K's question/answer fields)")
    try:
        import trl
    except ImportError:
        raise SystemExit("TRL is not installed: pip install --no-deps trl (the `bench` extra; keeps your torch)")
    import peft
    import torch
    import transformers

    sys.path.insert(0, ROOT)
    from tinyrl.policy import resolve_model

    model = os.path.abspath(a.model) if a.model else resolve_model("smollm2-135m")
    load = os.getloadavg()
    if load[0] > 1.5:
        print(f"warning: load average {load[0]:.2f} > 1.5 at start; timings will be noisy", flush=True)
    command = "python bench/vs_trl.py" + (" --smoke" if a.smoke else f" --rounds {a.rounds} --steps {a.steps}")
    for name in ("device", "dtype", "prompts", "group", "new_tokens", "time_limit"):
        if getattr(a, name) != ap.get_default(name):
            command += f" --{name.replace('_', '-')} {getattr(a, name)}"
    head = {
        "hardware": {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": THREADS,
                     "python": platform.python_version(),
                     "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
                     "peft": peft.__version__, "load_avg_at_start": [round(x, 2) for x in load]},
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "command": command + (" --trl-flush-denormal" if a.trl_flush_denormal else ""),
        "trl_flush_denormal": a.trl_flush_denormal,
        # glibc's allocator setting, if any: both children inherit it (docs/memory.md, bench/cpu_allocator.py)
        "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
        "model": model, "data": os.path.join(data, "train.jsonl"), "config": shared_settings(a.device),
        "counted": f"steps 2..{a.steps} of each run (step 1 is warm-up)"}
    if a.time_limit is not None:
        head["time_limit_s"] = a.time_limit
        head["skipped"] = []  # runs not started because the time limit had passed
    extra = ["--device", a.device, "--dtype", DTYPE, "--prompts", str(P), "--group", str(G), "--new-tokens",
             str(NEW_TOKENS)]
    extra += ["--trl-flush-denormal"] if a.trl_flush_denormal else []
    runs: list[dict] = []
    started = time.perf_counter()
    for r in range(a.rounds):
        for tool in TOOLS:
            elapsed = time.perf_counter() - started
            if a.time_limit is not None and elapsed > a.time_limit:
                print(f"round {r + 1}/{a.rounds}: {tool} not started ({elapsed:.0f} s > --time-limit)", flush=True)
                head["skipped"].append(f"round {r + 1} {tool}")
                continue
            print(f"round {r + 1}/{a.rounds}: {tool}, {a.steps} steps ...", flush=True)
            row = run_child(tool, model, data, a.steps, extra, echo=a.verbose or a.device == "cuda")
            row["round"] = r + 1
            if "error" in row:
                print(f"  {tool}: FAILED after {row['process_wall_s']:.0f} s: {row['error']}", flush=True)
            else:
                row["peak_rss_gib"] = round(row["peak_rss_bytes"] / 2**30, 3)
                gpu = (f", CUDA peak {row['cuda_peak_allocated_bytes'] / 2**30:.2f} GiB allocated "
                       f"{row['cuda_peak_reserved_bytes'] / 2**30:.2f} GiB reserved" if a.device == "cuda" else "")
                print(f"  {tool}: {row['median_step_s']:.1f} s/step (generate {row['median_generate_s']:.1f} s, "
                      f"{row['gen_tokens_per_s']:.1f} tok/s), peak RSS {row['peak_rss_gib']:.2f} GiB{gpu}, "
                      f"process {row['process_wall_s']:.0f} s", flush=True)
            runs.append(row)
            # rewritten after every run, so an invocation cut off later keeps the runs that finished
            write_json_atomic(out_path, report(head, runs, started, a.device, a.trl_flush_denormal))
    results = report(head, runs, started, a.device, a.trl_flush_denormal)
    write_json_atomic(out_path, results)

    ok = [r for r in runs if "error" not in r]
    print()
    if results["table"]:
        print(f"{a.rounds} round(s) x {a.steps} steps, median over steps 2..{a.steps}; (min-max over runs); "
              "ratio of medians [per round]")
        print(results["table"])
    lengths = {t: [r["completion_len_mean"] for r in ok if r["tool"] == t] for t in TOOLS}
    print(f"same prompts: {results['same_prompts']}, prompt tokens identical: {results['prompt_tokens_match']}, "
          "completion length " + " ".join(f"{name} {statistics.mean(lengths[t]):.1f}"
                                          for t, name in zip(TOOLS, ("tinyrl", "TRL")) if lengths[t]))
    print(f"wrote {out_path} ({results['wall_s']:.0f} s)")
    failed = len(runs) - len(ok)
    if failed:
        print(f"{failed} run(s) failed; their errors are in the JSON", flush=True)
    return 1 if failed or not ok else 0


if __name__ == "__main__":
    sys.exit(main())
