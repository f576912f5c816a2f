"""`--vram` on a real GPU: for each public geometry x budget, plan, then train under that hard cap and compare.

Each row runs the real loop (`tinyrl.loop.fit` with `--vram V`; rows one after another in this process) on a
random-init model with the geometry of Qwen2.5-0.5B, Llama-3.2-1B or Falcon3-1B (bench/randmodel.py: memory
does not depend on weight values; a random model never stops early, so every completion is the full 200
tokens), at paper settings: G=16, prompts truncated to 256 tokens, completions of 200, P=16 for the headline
rows (P = gen_batch/16 for the rest: the same peaks from one generate call). `fit` applies the plan and caps
torch's allocator at V less the measured CUDA context (`torch.cuda.set_per_process_memory_fraction`), so a
row that fits here fits a card of V. Recorded per row: the plan's knobs, planned vs measured peak allocated
bytes of the generation and training phases, the device total (allocator reserve + context) against V, OOM
back-offs, s/step. Rows whose plan equals an earlier row's of the same model are measured once.

    python bench/budget.py --data ../shared/data/gsm8k            # the sweep, ~6 min on an H100
    python bench/budget.py --dry-run                                # the plans only (no GPU needed)
    python bench/budget.py --rescore bench/results/budget_gpu.json  # the current planner vs those measurements
    python bench/budget.py --rows qwen:4G,qwen:8G --steps 2
    python bench/budget.py --rows falcon:4G --prior bench/results/budget_gpu.json   # add rows to a sweep
    python bench/budget.py --rows qwen:8G --top-p 0.9 --out bench/results/budget_gpu_top_p.json  # the sort's share

Writes bench/results/budget_gpu.json (or --out) after every row, so a partial sweep is kept.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

MODELS = {"qwen": "Qwen/Qwen2.5-0.5B-Instruct", "llama": "meta-llama/Llama-3.2-1B-Instruct",
          "falcon": "tiiuae/Falcon3-1B-Instruct"}
# The acceptance rows first (each geometry under 8 GiB, the 0.5B under 4 GiB), so a cut-short sweep keeps them.
ROWS = [("qwen", "8G"), ("llama", "8G"), ("falcon", "8G"), ("qwen", "4G"), ("llama", "4G"), ("qwen", "6G"),
        ("llama", "6G"), ("falcon", "6G"), ("qwen", "12G"), ("llama", "12G"), ("falcon", "12G"), ("qwen", "16G"),
        ("llama", "16G"), ("falcon", "16G"), ("falcon", "4G")]
HEADLINE = [("qwen", "8G"), ("llama", "8G"), ("falcon", "8G"), ("qwen", "4G")]  # run at P=16 (the others at
# P = gen_batch/16: the same peaks, one generate call, less time)
MiB = 2**20


def planned(model_dir: str, vram: str, data: str | None, caps, top_p: float = 1.0) -> dict:
    """The plan `fit` makes for this row at paper settings, without loading weights."""
    from tinyrl import loop
    from tinyrl.config import Config

    p = loop.make_plan(Config(task="gsm8k", data=data, model=model_dir, vram=vram, top_p=top_p), frozenset(), caps)
    return {"knobs": p.knobs(), "generate": p.breakdown.fixed + p.breakdown.generation,
            "train": p.breakdown.fixed + p.breakdown.training, "device": p.breakdown.peak,
            "budget": p.budget_bytes, "prompt_len": p.prompt_len}


def measure(model_dir: str, vram: str, data: str | None, knobs: dict, prompts: int, steps: int, out: str,
            top_p: float = 1.0) -> dict:
    """One row: the real `fit` with --vram, the plan's knobs pinned and `prompts` prompts per step; its metrics.

    Peaks do not depend on how many generate calls or micro-batches a step makes (each call's cache is freed
    before the next, each micro-batch's activations too), so rows other than the headline ones run
    P = gen_batch / G prompts (one generate call) to save time; `prompts_per_step` says which.
    """
    import dataclasses
    import gc
    import shutil

    import torch

    from tinyrl import loop
    from tinyrl.config import Config

    shutil.rmtree(out, ignore_errors=True)  # this bench's own run folder: never resume an earlier row's run
    cfg = dataclasses.replace(Config(task="gsm8k", data=data, model=model_dir, vram=vram, steps=steps, out=out,
                                     save_every=10_000, sample_every=10_000, prompts_per_step=prompts,
                                     top_p=top_p), **knobs)
    started = time.perf_counter()
    try:
        loop.fit(cfg, quiet=True, pins=frozenset(knobs) | {"prompts_per_step"})
        error = None
    except Exception as err:  # noqa: BLE001 - a failed row is a result; the sweep goes on
        traceback.print_exc()
        error = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:300]}"
    finally:
        gc.collect()
        lost = False
        if torch.cuda.is_available():  # the next row starts from an empty, uncapped allocator
            try:
                torch.cuda.empty_cache()
                torch.cuda.set_per_process_memory_fraction(1.0)
            except RuntimeError:  # a failed CUDA-graph capture leaves the allocator capturing: no row can follow
                traceback.print_exc()
                lost = True
    if lost:
        return {"error": error or "CUDA state lost", "prompts_per_step": prompts, "cuda_state_lost": True}
    path = os.path.join(out, "metrics.jsonl")
    rows = [json.loads(line) for line in open(path)] if os.path.exists(path) else []
    if not rows:
        return {"error": error or "no step logged", "prompts_per_step": prompts}
    worst = {k: max(r[k] for r in rows) for k in rows[0] if k.startswith(("mem/", "plan/", "oom/backoffs"))}
    last = {k: rows[-1][k] for k in rows[-1] if k.startswith(("time/", "oom/gen", "oom/micro", "len/mean"))}
    return {**worst, **last, "steps": len(rows), "prompts_per_step": prompts, "error": error,
            "wall_s": round(time.perf_counter() - started, 1)}


def compare(measured: dict, vram: str) -> dict:
    """Errors as (planned - measured) / measured: positive means the planner reserved more than was used.

    Fits: no error and no OOM back-off under the cap, and the allocated peak plus the memory outside torch's
    allocator within V (a row measured once under a larger V may have cached more; a cap makes the allocator
    return cached blocks before it fails, so allocated + context is what must fit)."""
    from tinyrl.budget import parse_bytes

    if measured.get("error") or "mem/device" not in measured:
        return {"fits": False}
    err = {key: round((measured[f"plan/{key}"] - measured[f"mem/{key}"]) / measured[f"mem/{key}"], 3)
           for key in ("generate", "train", "device")}
    outside = measured["mem/device"] - measured["mem/reserved"]
    needed = max(measured["mem/generate"], measured["mem/train"]) + outside
    return {"fits": measured["oom/backoffs"] == 0 and needed <= parse_bytes(vram), "needed_bytes": needed,
            **{f"error_{key}": value for key, value in err.items()}}


def rescore(path: str) -> None:
    """Re-plan every measured row's settings with the planner as it is now (after calibrating its constants on
    these measurements) and print and record the errors next to those of the planner that ran."""
    from tinyrl import budget

    with open(path) as f:
        result = json.load(f)
    caps = budget.DeviceCaps(result["hardware"]["gpu"], result["hardware"]["gpu_total"], bf16=True)
    # sweeps from before the rows of a group shared their prompt (generation and training) did not record it
    shared = result["settings"].get("shared_prompts", False)
    # training shared the prompt on CUDA from 2026-11-25 (after the first sweep) to 2026-11-26 (policy.share_scoring)
    scoring = result["settings"].get("shared_scoring", shared)
    # decoding repeated K/V to every head under transformers 5.17 (the version of the sweeps before this key)
    repeats = result["settings"].get("decode_repeats_kv", result["hardware"].get("transformers") == "5.17.0")
    laid_out = result["settings"].get("laid_out_cache", False)  # sweeps before policy.lay_out grew the cache
    autograd = result["settings"].get("logprob_backward") != "hand-written"  # before policy._TokenLogprob
    for row in result["rows"]:
        m = row["measured"]
        if "mem/device" not in m:
            continue
        knobs = {**row["plan"]["knobs"], "prompts_per_step": m["prompts_per_step"]}
        g = budget.geometry_from_config(budget.PUBLIC_CONFIGS[row["geometry"]])
        bd = budget.estimate(g, budget.Settings(**knobs), row["plan"]["prompt_len"], caps, encoder_bytes=0,
                             shared_prompts=shared, top_p=result["settings"].get("top_p", 1.0),
                             shared_scoring=scoring, repeats_kv=repeats,
                             laid_out=laid_out, autograd_logprobs=autograd)
        now = {"generate": bd.fixed + bd.generation, "train": bd.fixed + bd.training, "device": bd.peak}
        row["rescored"] = {f"error_{k}": round((v - m[f"mem/{k}"]) / m[f"mem/{k}"], 3) for k, v in now.items()}
        row["rescored"]["error_needed"] = round((bd.peak - row["needed_bytes"]) / row["needed_bytes"], 3)
        ran_needed = (m["plan/device"] - row["needed_bytes"]) / row["needed_bytes"]
        print(f"{row['model']:<7}{row['vram']:>4}  ran: gen {row['error_generate']:+.1%} "
              f"train {row['error_train']:+.1%} needed {ran_needed:+.1%}   now: gen {row['rescored']['error_generate']:+.1%} "
              f"train {row['rescored']['error_train']:+.1%} needed {row['rescored']['error_needed']:+.1%} "
              f"(device incl. allocator cache {row['rescored']['error_device']:+.1%})")
    result["rescored"] = {"date": time.strftime("%Y-%m-%d"), "shared_prompts": shared, "shared_scoring": scoring,
                          "decode_repeats_kv": repeats, "laid_out_cache": laid_out,
                          "autograd_logprobs": autograd,
                          "what": "errors of the current planner's constants for the same settings and the same "
                                  "code paths as measured (rows[].rescored)"}
    write_atomic(path, result)


def hardware() -> dict:
    import platform

    import torch

    from hardware import cpu_name

    info = {"cpu": cpu_name(), "python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("transformers", "peft", "bitsandbytes"):
        try:
            info[pkg] = __import__(pkg).__version__
        except Exception:  # noqa: BLE001 - a missing optional package is recorded as such
            info[pkg] = None
    if torch.cuda.is_available():
        info.update(gpu=torch.cuda.get_device_name(0), gpu_total=torch.cuda.get_device_properties(0).total_memory,
                    cuda=torch.version.cuda)
    return info


def write_atomic(path: str, result: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    os.replace(path + ".tmp", path)


def line(r: dict) -> str:
    m, k = r["measured"], r["plan"]["knobs"]
    head = (f"{r['model']:<7}{r['vram']:>4}  {k['quant']:>4} gen_batch {k['gen_batch']:>3} micro {k['micro_batch']} "
            f"chunk {k['logprob_chunk']} ckpt {'on ' if k['grad_checkpointing'] else 'off'}")
    if "mem/device" not in m or m.get("error"):
        return f"{head}  {m.get('error') or 'not run'}"
    return (f"{head}  gen {m['mem/generate'] / MiB:6.0f}/{m['plan/generate'] / MiB:6.0f} MiB "
            f"({r['error_generate']:+.0%})  train {m['mem/train'] / MiB:6.0f}/{m['plan/train'] / MiB:6.0f} MiB "
            f"({r['error_train']:+.0%})  device {m['mem/device'] / MiB:6.0f}/{m['plan/device'] / MiB:6.0f} MiB  "
            f"{'fits' if r['fits'] else 'DOES NOT FIT'}  {m['time/step']:.1f} s/step (P={m['prompts_per_step']})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "data", "gsm8k"))
    ap.add_argument("--rows", default=",".join(f"{m}:{v}" for m, v in ROWS), help="MODEL:VRAM,... in this order")
    ap.add_argument("--prior", help="a results file of an earlier (partial) sweep: its rows are kept, not rerun")
    ap.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (< 1 adds the sort's working set)")
    ap.add_argument("--steps", type=int, default=1, help="optimizer steps per row (peaks are the max over them)")
    ap.add_argument("--work", default="/tmp/tinyrl-budget", help="random-init models and runs go here")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "budget_gpu.json"))
    ap.add_argument("--time-limit", type=float, default=1e9, help="start no new row after this many seconds")
    ap.add_argument("--dry-run", action="store_true", help="print the plans only (for an H100; no GPU needed)")
    ap.add_argument("--rescore", metavar="RESULTS", help="re-plan the measured rows of RESULTS with the current "
                    "planner and add its errors (no GPU needed)")
    args = ap.parse_args()
    if args.rescore:
        rescore(args.rescore)
        return
    data = args.data if os.path.isdir(args.data) else None

    import torch
    from randmodel import char_tokenizer, make_random_model

    from tinyrl import budget, policy
    from tinyrl.errors import UserError

    started = time.perf_counter()
    rows = [tuple(spec.split(":")) for spec in args.rows.split(",")]
    def valid(row: tuple) -> bool:
        try:
            return len(row) == 2 and row[0] in MODELS and budget.parse_bytes(row[1]) > 0
        except UserError:
            return False

    bad = [":".join(r) for r in rows if not valid(r)]
    if bad:
        sys.exit(f"--rows {','.join(bad)}: use MODEL:VRAM with MODEL one of {', '.join(MODELS)}, e.g. qwen:8G")
    caps = budget.DEVICES["H100"] if args.dry_run else budget.detect_caps()
    if not (args.dry_run or caps.cuda):
        sys.exit("bench/budget.py measures CUDA memory: run it on a GPU, or pass --dry-run for the plans")
    result = {"what": "tinyrl fit --vram V on random-init public geometries (G=16, prompts truncated to 256 "
                      "tokens, 200-token completions): planned vs measured peak allocated bytes per phase, and "
                      "device bytes (allocator reserve + CUDA context) vs V",
              "settings": {"group_size": 16, "max_prompt_tokens": 256, "max_new_tokens": 200, "method": "r1",
                           "shared_prompts": True, "top_p": args.top_p,
                           "shared_scoring": policy.share_scoring(torch.device("cuda")),
                           "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
                           "decode_repeats_kv": budget.decode_repeats_kv(),
                           "laid_out_cache": budget.cache_lays_out(),
                           "logprob_backward": "hand-written",  # policy._TokenLogprob (before it: autograd)
                           "steps": args.steps, "headline rows (P=16)": [f"{m} {v}" for m, v in HEADLINE]},
              "hardware": hardware(), "date": time.strftime("%Y-%m-%d"), "rows": []}
    measured_by_knobs: dict[str, dict] = {}
    if args.prior:
        with open(args.prior) as f:
            prior = json.load(f)
        code = ("shared_prompts", "shared_scoring", "decode_repeats_kv", "laid_out_cache", "top_p",
                "PYTORCH_CUDA_ALLOC_CONF", "logprob_backward")  # what the rows' code and settings were: one file holds one of each
        differ = [k for k in code if prior["settings"].get(k) != result["settings"][k]]
        if differ:
            sys.exit(f"--prior {args.prior} was measured with other code or settings ({', '.join(differ)}): "
                     "start a new sweep (another --out) instead of adding to it")
        result["rows"] = prior["rows"]
        done = {(r["model"], r["vram"]) for r in result["rows"]}
        rows = [row for row in rows if row not in done]
        for r in result["rows"]:
            if "mem/device" in r["measured"]:
                measured_by_knobs[r["model"] + json.dumps(r["plan"]["knobs"], sort_keys=True)] = r["measured"]
    for model, vram in rows:
        if time.perf_counter() - started > args.time_limit:
            print(f"time limit reached; skipping {model} {vram} and the rest", flush=True)
            break
        name = MODELS[model]
        folder = os.path.join(args.work, model)
        if args.dry_run and not os.path.exists(os.path.join(folder, "config.json")):
            os.makedirs(folder, exist_ok=True)  # the planner needs config.json and the tokenizer only
            with open(os.path.join(folder, "config.json"), "w") as f:
                json.dump({k: v for k, v in budget.PUBLIC_CONFIGS[name].items() if not k.startswith("_")}, f)
            char_tokenizer(budget.PUBLIC_CONFIGS[name]["vocab_size"]).save_pretrained(folder)
        elif not args.dry_run:
            make_random_model(name, folder)
        plan = planned(folder, vram, data, caps, args.top_p)
        key = model + json.dumps(plan["knobs"], sort_keys=True)
        if args.dry_run:
            measured = {"error": "dry run"}
        elif key in measured_by_knobs:
            measured = {**measured_by_knobs[key], "same_settings_as": measured_by_knobs[key]["vram"]}
        else:
            prompts = 16 if (model, vram) in HEADLINE else max(1, plan["knobs"]["gen_batch"] // 16)
            out = os.path.join(args.work, "runs", f"{model}-{vram}" + (f"-top_p{args.top_p}" if args.top_p < 1 else ""))
            measured = {**measure(folder, vram, data, plan["knobs"], prompts, args.steps, out,
                                   args.top_p), "vram": vram}
            measured_by_knobs[key] = measured
        row = {"model": model, "geometry": name, "vram": vram, "plan": plan, "measured": measured,
               **compare(measured, vram)}
        result["rows"].append(row)
        print(line(row), flush=True)
        if not args.dry_run:
            write_atomic(args.out, result)
        if measured.get("cuda_state_lost"):
            print("this process cannot use CUDA any more (a failed graph capture); the sweep stops here: rerun with "
                  "--prior to go on", flush=True)
            break
    if not args.dry_run:
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
