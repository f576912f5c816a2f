"""tinyrl vs TRL GRPOTrainer, side by side: the same model, prompts, P, G, lengths, seed and CPU threads, run
alternately in one invocation. Writes bench/results/vs_trl.json.

    python bench/vs_trl.py              # 2 rounds x 4 steps per tool, ~10 min on 2 quiet cores
    python bench/vs_trl.py --smoke      # 1 round x 2 steps: checks both paths work
    python bench/vs_trl.py --model PATH --rounds 3 --steps 5

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
"""

from __future__ import annotations

import argparse
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

from hardware import cpu_name

from tinyrl.meter import peak_bytes

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
OUT = os.path.join(HERE, "results", "vs_trl.json")
DEFAULT_DATA = os.path.join(ROOT, "..", "shared", "data", "gsm8k")

# The shared geometry and optimisation settings (both tools get these).
P, G, NEW_TOKENS, THREADS, SEED = 2, 4, 64, 2, 0
SETTINGS = {"prompts_per_step": P, "group_size": G, "max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS,
            "temperature": 0.9, "top_p": 1.0, "top_k": 0, "lora_rank": 16, "lora_alpha": 32, "lora_dropout": 0.0,
            "lora_targets": "q,k,v,o,gate,up,down", "grad_checkpointing": True, "dtype": "fp32", "kl_beta": 0.04,
            "loss_type": "grpo", "lr": 5e-6, "adam_betas": [0.9, 0.99], "weight_decay": 0.1, "max_grad_norm": 0.1,
            "lr_schedule": "10% linear warm-up, cosine", "rewards": "tinyrl r1 task rewards (xml_count, "
            "soft_format, strict_format, integer, correctness; exact match)", "threads": THREADS, "seed": SEED,
            "task": "gsm8k train, the prompts tinyrl draws (seeded per-epoch shuffle), XML system prompt"}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# --- shared helpers --------------------------------------------------------------------------------


def vm_hwm() -> int:
    """Peak RSS (VmHWM) of this process in bytes; 0 where /proc is missing."""
    return peak_bytes(torch_cpu())


def torch_cpu():
    import torch

    return torch.device("cpu")


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


def write_json_atomic(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def tinyrl_prompts(data: str, steps: int):
    """The P examples of each step exactly as tinyrl's loop draws them: [steps][P] Examples."""
    from tinyrl.loop import examples_for_step
    from tinyrl.tasks import load_task

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


def child_tinyrl(model: str, data: str, steps: int) -> dict:
    import torch

    from tinyrl import loop
    from tinyrl.config import Config

    torch.set_num_threads(THREADS)
    monitor = PeakRSS()
    root = tempfile.mkdtemp(prefix="vs-trl-tinyrl-")
    cfg = Config(task="gsm8k", data=data, model=model, out=os.path.join(root, "run"), method="r1", steps=steps,
                 seed=SEED, prompts_per_step=P, group_size=G, micro_batch=P * G, gen_batch=P * G,
                 max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, temperature=0.9, top_p=1.0, lr=5e-6,
                 weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.99, warmup_ratio=0.1, max_grad_norm=0.1,
                 kl_beta=0.04, quant="none", dtype="fp32", lora_rank=16, lora_alpha=32, grad_checkpointing=True,
                 device="cpu", threads=THREADS, save_every=10**6, sample_every=10**6)
    started = time.perf_counter()
    run = loop.fit(cfg, quiet=True)
    wall = time.perf_counter() - started
    with open(os.path.join(run, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    shutil.rmtree(root, ignore_errors=True)
    phase_peak = max(max(r.get("mem/generate", 0), r.get("mem/train", 0), r.get("mem/score", 0)) for r in rows)
    peak = max(monitor.stop(), phase_peak)
    out = step_summary([r["time/step"] for r in rows], [r["time/generate"] for r in rows])
    out.update({"tool": "tinyrl", "steps": len(rows), "wall_s": round(wall, 1), "peak_rss_bytes": peak,
                "completion_len_mean": statistics.mean(r["len/mean"] for r in rows),
                "reward_mean": statistics.mean(r["reward/total"] for r in rows),
                "questions": [ex.question[:60] for step in tinyrl_prompts(data, steps) for ex in step]})
    return out


# --- child: TRL ------------------------------------------------------------------------------------


def reward_funcs():
    """tinyrl's r1 task rewards as TRL reward functions (TRL passes conversational completions as messages)."""
    from tinyrl import rewards

    def texts(completions):
        return [c[0]["content"] if isinstance(c, list) else c for c in completions]

    def make(fn, name, needs_answer):
        def reward(completions, answer=None, **kw):
            return fn(texts(completions), answer) if needs_answer else fn(texts(completions))
        reward.__name__ = name
        return reward

    return [make(rewards.xml_count, "xml_count", False), make(rewards.soft_format, "soft_format", False),
            make(rewards.strict_format, "strict_format", False), make(rewards.integer, "integer", False),
            make(rewards.correctness, "correctness", True)]


def child_trl(model: str, data: str, steps: int, flush_denormal: bool = False) -> dict:
    import torch
    import transformers
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from tinyrl import policy, prompts

    torch.set_num_threads(THREADS)
    monitor = PeakRSS()
    batches = tinyrl_prompts(data, steps)
    rows = [{"prompt": [{"role": "system", "content": prompts.SYSTEM_PROMPT},
                        {"role": "user", "content": ex.question}], "answer": ex.answer}
            for batch in batches for ex in batch]  # file order = tinyrl's draw order; TRL does not shuffle
    dataset = Dataset.from_list(rows)

    # The prompt tokens tinyrl would feed the model, to check TRL renders the same ones.
    tokenizer = policy.load_tokenizer(model)
    ours = prompts.render(list(batches[0]), tokenizer, 256, system_prompt=prompts.SYSTEM_PROMPT)
    ours_ids = [row[mask.bool()].tolist() for row, mask in zip(ours.input_ids, ours.attention_mask)]

    root = tempfile.mkdtemp(prefix="vs-trl-trl-")
    args = GRPOConfig(
        output_dir=root, max_steps=steps, seed=SEED, per_device_train_batch_size=P * G,
        gradient_accumulation_steps=1, num_generations=G, max_completion_length=NEW_TOKENS,
        generation_kwargs={"min_new_tokens": NEW_TOKENS}, temperature=0.9, top_p=1.0, top_k=0,
        beta=0.04, loss_type="grpo", learning_rate=5e-6, adam_beta1=0.9, adam_beta2=0.99, weight_decay=0.1,
        max_grad_norm=0.1, lr_scheduler_type="cosine", warmup_steps=0.1, gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False}, bf16=False, fp16=False, use_cpu=True,
        shuffle_dataset=False, model_init_kwargs={"dtype": torch.float32}, logging_steps=1, save_strategy="no",
        report_to="none", disable_tqdm=True, dataloader_num_workers=0)
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
        t0 = time.perf_counter()
        completion_ids, logprobs = generate(prompt_ids, *a, **kw)
        gen_s.append(time.perf_counter() - t0)
        seen["lengths"].extend(len(c) for c in completion_ids)
        return completion_ids, logprobs

    trainer._generate_single_turn = timed_generate

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            step_s.append(time.perf_counter() - self.t0)

    trainer.add_callback(StepTimer())
    if flush_denormal:  # what tinyrl's policy.load_policy does on CPU; off by default (TRL as shipped)
        torch.set_flush_denormal(True)
    started = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - started
    shutil.rmtree(root, ignore_errors=True)
    rewards_logged = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    out = step_summary(step_s, gen_s)
    # TRL's prompts repeat each question G times in a generation batch; compare one row per question.
    trl_ids = seen["prompt_ids"][::G] if seen["prompt_ids"] else []
    out.update({"tool": "trl", "steps": len(step_s), "wall_s": round(wall, 1), "peak_rss_bytes": monitor.stop(),
                "completion_len_mean": statistics.mean(seen["lengths"]) if seen["lengths"] else None,
                "reward_mean": statistics.mean(rewards_logged) if rewards_logged else None,
                "prompt_tokens_match_tinyrl": trl_ids == ours_ids,
                "questions": [r["prompt"][1]["content"][:60] for r in rows],
                "versions": {"trl": __import__("trl").__version__, "transformers": transformers.__version__}})
    return out


# --- parent ----------------------------------------------------------------------------------------


def run_child(tool: str, model: str, data: str, steps: int, extra: list[str]) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), MKL_NUM_THREADS=str(THREADS), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=ROOT + os.pathsep +
               os.environ.get("PYTHONPATH", ""))
    fd, result = tempfile.mkstemp(prefix=f"vs-trl-{tool}-", suffix=".json")
    os.close(fd)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", tool, "--model", model, "--data", data,
           "--steps", str(steps), "--result", result, *extra]
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"{tool} run failed (exit {proc.returncode}); its output is above")
    with open(result) as f:
        out = json.load(f)
    os.unlink(result)
    out["process_wall_s"] = round(time.perf_counter() - started, 1)
    return out


def spread(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
            "max": round(max(values), 3)}


def render_table(summary: dict, ratios: dict) -> str:
    """Median (min-max over runs) per tool and the ratio of medians tinyrl/TRL [per round]."""
    labels = {"s_per_step": "s/step", "generate_s": "generate s/step", "rest_s": "rest s/step",
              "gen_tokens_per_s": "gen tokens/s", "peak_rss_gib": "peak RSS GiB"}

    def cell(s: dict) -> str:
        return f"{s['median']:.2f}" if s["min"] == s["max"] else f"{s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f})"

    header = f"{'':17}{'tinyrl':>22}{'TRL':>22}   tinyrl/TRL [per round]"
    lines = [header, "-" * len(header)]
    for name, label in labels.items():
        q = ratios[name]
        rounds = ", ".join(f"{x:.2f}" for x in q["per_round"])
        lines.append(f"{label:17}{cell(summary['tinyrl'][name]):>22}{cell(summary['trl'][name]):>22}   "
                     f"{q['of_medians']:.2f} [{rounds}]")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model folder (default: the offline smollm2-135m copy)")
    ap.add_argument("--data", default=DEFAULT_DATA, help="GSM8K folder with train.jsonl (default ../shared/data/gsm8k)")
    ap.add_argument("--rounds", type=int, default=2, help="alternating tinyrl/TRL pairs")
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps per run (step 1 is warm-up)")
    ap.add_argument("--smoke", action="store_true", help="1 round of 2 steps: both paths work")
    ap.add_argument("--out", default=OUT, help="results JSON")
    ap.add_argument("--trl-flush-denormal", action="store_true",
                    help="diagnostic: give TRL tinyrl's torch.set_flush_denormal(True) (off: TRL as shipped)")
    ap.add_argument("--child", choices=("tinyrl", "trl"), help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    a = ap.parse_args()

    if a.child:
        if a.child == "tinyrl":
            out = child_tinyrl(a.model, a.data, a.steps)
        else:
            out = child_trl(a.model, a.data, a.steps, flush_denormal=a.trl_flush_denormal)
        write_json_atomic(a.result, out)
        return 0

    if a.smoke:
        a.rounds, a.steps = 1, 2
        if a.out == OUT:  # a smoke run never overwrites the real result
            a.out = os.path.join(tempfile.gettempdir(), "vs_trl_smoke.json")
    if a.steps < 2:
        raise SystemExit("--steps must be at least 2 (step 1 is warm-up and not counted)")
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
    results = {
        "hardware": {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": THREADS,
                     "python": platform.python_version(),
                     "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
                     "peft": peft.__version__, "load_avg_at_start": [round(x, 2) for x in load]},
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "command": "python bench/vs_trl.py" + (" --smoke" if a.smoke else f" --rounds {a.rounds} --steps {a.steps}")
        + (" --trl-flush-denormal" if a.trl_flush_denormal else ""),
        "trl_flush_denormal": a.trl_flush_denormal,
        "model": model, "data": os.path.join(data, "train.jsonl"), "config": SETTINGS,
        "counted": f"steps 2..{a.steps} of each run (step 1 is warm-up)", "runs": []}
    started = time.perf_counter()
    for r in range(a.rounds):
        for tool in ("tinyrl", "trl"):
            print(f"round {r + 1}/{a.rounds}: {tool}, {a.steps} steps ...", flush=True)
            row = run_child(tool, model, data, a.steps, ["--trl-flush-denormal"] if a.trl_flush_denormal else [])
            row["round"] = r + 1
            results["runs"].append(row)
            print(f"  {tool}: {row['median_step_s']:.1f} s/step (generate {row['median_generate_s']:.1f} s, "
                  f"{row['gen_tokens_per_s']:.1f} tok/s), peak RSS {row['peak_rss_bytes'] / 2**30:.2f} GiB, "
                  f"process {row['process_wall_s']:.0f} s", flush=True)
    results["wall_s"] = round(time.perf_counter() - started, 1)
    results["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]

    by_tool = {t: [r for r in results["runs"] if r["tool"] == t] for t in ("tinyrl", "trl")}
    trl_run = by_tool["trl"][0]
    results["same_prompts"] = all(r["questions"] == trl_run["questions"] for r in results["runs"])
    results["prompt_tokens_match"] = all(r.get("prompt_tokens_match_tinyrl") for r in by_tool["trl"])
    metrics = {"s_per_step": "median_step_s", "generate_s": "median_generate_s", "rest_s": "median_rest_s",
               "gen_tokens_per_s": "gen_tokens_per_s", "peak_rss_gib": "peak_rss_bytes"}
    scale = {"peak_rss_gib": 1 / 2**30}
    summary, ratios = {}, {}
    for name, key in metrics.items():
        for tool in ("tinyrl", "trl"):
            summary.setdefault(tool, {})[name] = spread([r[key] * scale.get(name, 1) for r in by_tool[tool]])
        per_round = [t[key] / p[key] for t, p in zip(by_tool["tinyrl"], by_tool["trl"])]  # tinyrl / TRL
        ratios[name] = {"of_medians": round(summary["tinyrl"][name]["median"] / summary["trl"][name]["median"], 3),
                        "per_round": [round(x, 3) for x in per_round]}
    results["summary"] = summary
    results["ratios_tinyrl_over_trl"] = ratios
    results["not_like_for_like"] = [
        "sampling differs (different RNG use); equal work is forced with min_new_tokens = max_new_tokens = 64",
        "tinyrl sets torch.set_flush_denormal(True) on CPU; TRL runs with PyTorch's default"
        + (" (this run: TRL also flushes, --trl-flush-denormal)" if a.trl_flush_denormal else ""),
        "TRL's LM head scores every position of prompt+completion and computes entropy; tinyrl scores completion "
        "tokens only (this is part of what is being compared)",
        "TRL generate time is _generate_single_turn (padding + model.generate); tinyrl's is policy.generate "
        "(also decodes); the rest of each step (reference pass, rewards, loss, backward, optimizer) is 'rest'",
    ]
    for r in results["runs"]:
        r["peak_rss_gib"] = round(r["peak_rss_bytes"] / 2**30, 3)
        r.pop("questions", None)

    table = render_table(summary, ratios)
    results["table"] = table
    print()
    print(f"{a.rounds} round(s) x {a.steps} steps, median over steps 2..{a.steps}; (min-max over runs); "
          "ratio of medians [per round]")
    print(table)
    print(f"same prompts: {results['same_prompts']}, prompt tokens identical: {results['prompt_tokens_match']}, "
          f"completion length tinyrl {statistics.mean(r['completion_len_mean'] for r in by_tool['tinyrl']):.1f} "
          f"TRL {statistics.mean(r['completion_len_mean'] for r in by_tool['trl']):.1f}")
    write_json_atomic(a.out, results)
    print(f"wrote {a.out} ({results['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
