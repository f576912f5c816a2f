"""Write the README's results table from bench/results/*.json (every number in it comes from a bench script).

    python bench/table.py            # rewrites the block between the results markers in README.md
"""

from __future__ import annotations

import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
README = os.path.join(HERE, "..", "README.md")
START, END = "<!-- results:start (bench/table.py) -->", "<!-- results:end -->"


def load(name: str) -> dict | None:
    path = os.path.join(HERE, "results", name)
    return json.load(open(path)) if os.path.exists(path) else None


def rows() -> list[tuple[str, str, str, str]]:
    out = learn_rows("learn_cpu.json", "bench/learn.py") + learn_rows("learn_gpu.json", "bench/learn.py --gsm8k")
    fit = load("fit_cpu.json")
    if fit:
        hw = f"{fit['hardware']['cpu']}, {fit['hardware']['cores']} cores"
        d = fit["demo"]
        out.append(("demo: SmolLM2-135M learns the toy reward (first 5 → last 5 steps)",
                    f"{d['reward_first5']:.2f} → {d['reward_last5']:.2f} in {d['wall_s']:.0f} s", hw,
                    "bench/fit_cpu.py"))
        if "memory_share" in fit:
            m = fit["memory_share"]
            out.append(("Memory-R+ share of a step (encode + search + rewards + write; SmolLM2, GSM8K, P=2 G=4)",
                        f"{100 * m['median_share']:.1f} % ({m['median_memory_s']:.2f} s of {m['median_step_s']:.1f} s)",
                        hw, "bench/fit_cpu.py"))
    cost = load("reward_cost_cpu.json")
    if cost:
        hw = f"{cost['hardware']['cpu']}, {cost['hardware']['cores']} cores"
        shares = "; ".join(f"{task} {100 * r['share_of_step']:.2g} %" for task, r in cost["fit"].items())
        out.append(("reward scoring share of a step, math-verify included (SmolLM2-135M, P=4 G=8, 96 tokens)", shares,
                    hw, "bench/reward_cost.py"))
    options = load("grpo_options_cpu.json")
    if options:
        hw = f"{options['hardware']['cpu']}, {options['hardware']['cores']} cores"
        paper, free = options["summary"]["paper (beta 0.04)"], options["summary"]["beta 0"]
        result = (f"{free['time/train']:.1f} vs {paper['time/train']:.1f} s (×{free['train_ratio']:.2f}); "
                  f"{free['time/step']:.1f} vs {paper['time/step']:.1f} s (×{free['step_ratio']:.2f})")
        out.append(("beta 0 vs the paper's beta 0.04, side by side: training phase; whole step (SmolLM2-135M, P=4 "
                     "G=8, 128 tokens)", result, hw, "bench/grpo_options.py"))
    out += vs_trl_rows("vs_trl.json", "SmolLM2-135M, fp32", "peak RSS", "peak_rss_gib", "bench/vs_trl.py")
    out += vs_trl_rows("vs_trl_cpu_bf16.json", "SmolLM2-135M, both in bf16", "peak RSS", "peak_rss_gib",
                       "bench/vs_trl.py --dtype bf16")
    mem = load("memory.json")
    if mem:
        hw = f"{mem['hardware']['cpu']}, {mem['hardware']['cores']} cores"
        ef = mem["settings"]["expansion_search"]
        q = mem["store"]["query"][f"expansion_search={ef}"]
        out.append((f"memory: query p50 / p99 at 100k keys (int8 usearch, mmap + delta, search width {ef})",
                    f"{q['p50_ms']:.2f} / {q['p99_ms']:.2f} ms", hw, "bench/memory.py"))
        out.append(("memory: recall@1 vs exact search, 100k clustered keys",
                    f"{q['recall@1']:.3f}", hw, "bench/memory.py"))
        if "real_gsm8k" in mem:
            real = mem["real_gsm8k"][f"expansion_search={ef}"]
            out.append(("memory: recall@1 on real MiniLM keys (GSM8K test questions vs 7,473 train keys)",
                        f"{real['recall@1']:.3f}", hw, "bench/memory.py --real"))
        out.append(("memory: open 100k-key memory (mmap)", f"{mem['store']['open_state_ms']:.1f} ms", hw,
                    "bench/memory.py"))
        step = mem["step"][0]
        out.append((f"memory work per step, {step['completions']} completions, K={step['k']} (encode excluded)",
                    f"{step['median_ms']['total']:.1f} ms", hw, "bench/memory.py"))
    budget = load("budget_cpu.json")
    if budget:
        errors = [p["error"] for c in budget["cases"] for p in c["phases"] if p["error"] is not None]
        hw = budget["hardware"]
        out.append(("planner: every phase's estimate vs measured (CPU, fp32 and bf16, random Llama)",
                    f"{100 * min(errors):+.0f} … {100 * max(errors):+.0f} %",
                    hw["cpu"] if isinstance(hw, dict) and "cpu" in hw else "CPU", "bench/budget_cpu.py"))
    out += gpu_rows()
    return out


def learn_rows(name: str, script: str) -> list[tuple[str, str, str, str]]:
    """The learning evidence: held-out accuracy of the base model and of each method's run (bench/learn.py)."""
    got = load(name)
    if not got:
        return []
    s, hw = got["settings"], got["hardware"]
    where = f"{hw['gpu']}" if hw.get("gpu") else f"{hw['cpu']}, {hw['cores']} cores"
    task = ("GSM8K" if s["task"] == "gsm8k" else
            f"arith ({s['arith_ops']} op, numbers ≤ {s['arith_max']})")
    steps = sorted({run["steps_done"] if "steps_done" in run else len(run["metrics"]) for run in got["runs"].values()})
    out = []
    for metric, label in (("exact_match", "exact match"), ("extractive_match", "extractive match")):
        runs = "; ".join(f"{run_name.replace(' seed ', ', seed ')} {100 * run['eval'][metric]:.1f} %"
                         for run_name, run in got["runs"].items())
        out.append((f"learning: {os.path.basename(s['model'].rstrip('/'))}, held-out {task}, {got['held_out']} problems, {label}, base → after "
                    f"{'/'.join(map(str, steps))} steps (G={s['group_size']}, P={s['prompts_per_step']})",
                    f"base {100 * got['base'][metric]:.1f} % → {runs}", where, script))
    return out


def gpu_rows() -> list[tuple[str, str, str, str]]:
    out = []
    sweep = load("budget_gpu.json")
    if sweep:
        hw = f"{sweep['hardware']['gpu']} (torch {sweep['hardware']['torch'].split('+')[0]}, CUDA {sweep['hardware']['cuda']})"
        rows = {(r["model"], r["vram"]): r for r in sweep["rows"] if "mem/device" in r["measured"]}
        names = {"qwen": "Qwen2.5-0.5B", "llama": "Llama-3.2-1B", "falcon": "Falcon3-1B"}
        for vram in ("8G", "4G", "12G", "16G"):
            got = [r for (m, v), r in rows.items() if v == vram]
            if not got:
                continue

            def cell(r: dict) -> str:
                m = r["measured"]
                if m.get("same_settings_as"):
                    return f"{names[r['model']]}: fits, the {m['same_settings_as']} settings"
                verdict = "fits" if r["fits"] else f"DOES NOT FIT ({m.get('oom/backoffs', 0)} OOM back-off)"
                quant = {"none": "16-bit", "4bit": "4-bit"}[r["plan"]["knobs"]["quant"]]
                return (f"{names[r['model']]} {quant}, micro-batch {r['plan']['knobs']['micro_batch']}: {verdict}, "
                        f"needs {r['needed_bytes'] / 2**30:.2f} GiB, {m['time/step']:.0f} s/step "
                        f"(P={m['prompts_per_step']})")

            cells = [cell(r) for r in got]
            out.append((f"`fit --vram {vram}` under a hard {vram[:-1]} GiB cap, random-init geometries, G=16, "
                        f"256+200 tokens, as planned on {sweep['date']} (the planner has since grown the micro-batch "
                        "to fill the card: `tinyrl plan` shows today's)", "; ".join(cells), hw, "bench/budget.py"))
        measured = list(rows.values())
        for key, label in (("error_generate", "generation"), ("error_train", "training")):
            ran = [r[key] for r in measured]
            now = [r["rescored"][key] for r in measured if "rescored" in r]
            span = f"{100 * min(ran):+.0f} … {100 * max(ran):+.0f} %"
            cell = f"{span} as run"
            if now and f"{100 * min(now):+.0f} … {100 * max(now):+.0f} %" != span:
                cell += f"; {100 * min(now):+.0f} … {100 * max(now):+.0f} % with the current planner"
            runs = sum(not r["measured"].get("same_settings_as") for r in measured)
            out.append((f"planner vs measured peak allocated, {label} phase ({len(measured)} GPU rows, {runs} runs)",
                        cell, hw,
                        "bench/budget.py"))
    out += vs_trl_rows("vs_trl_gpu.json", "Qwen2.5-0.5B geometry, bf16", "CUDA peak allocated",
                       "cuda_allocated_gib", "bench/vs_trl.py --device cuda")
    return out + profile_rows(load("profile_gpu.json"))


def profile_rows(result: dict | None) -> list[tuple[str, str, str, str]]:
    """From bench/profile_gpu.py on a GPU: decoding eagerly against replayed CUDA graphs, and the training step
    at its fastest micro-batch, with the T4 estimate (marked as one)."""
    if not result or not result["hardware"].get("peak_flops"):
        return []
    phases = {p["phase"]: p for p in result["phases"] if "error" not in p}
    eager, graph = phases.get("generate (eager)"), phases.get("generate (graph)")
    s, hw, script = result["settings"], result["hardware"]["device"], "bench/profile_gpu.py"
    what = f"{s['model']} geometry, {s['dtype']}, P={s['P']} G={s['G']}, {s['new_tokens']} tokens"
    out = []
    if eager and graph:
        out.append((f"decoding: eager → one CUDA graph replay per token ({what})",
                    f"{eager['tokens_per_s']:,.0f} → {graph['tokens_per_s']:,.0f} tokens/s, "
                    f"{eager['launches']:,} → {graph['launches']:,} launches, same tokens "
                    f"{100 * graph['same_tokens_as_eager']:.1f} %; T4 estimate {graph['t4_estimate_s']:.1f} s",
                    hw, script))
    trains = [p for name, p in phases.items() if name.startswith("train")]
    if trains:
        best = min(trains, key=lambda p: p["s"])
        out.append((f"training step, fastest variant ({what})",
                    f"{best['phase'][len('train ('):-1]}: {best['s']:.2f} s, "
                    f"{100 * best['share_of_peak_flops']:.0f} % of peak FLOP/s; T4 estimate "
                    f"{best['t4_estimate_s']:.1f} s", hw, script))
    return out


def vs_trl_rows(name: str, what: str, mem_label: str, mem_key: str, script: str) -> list[tuple[str, str, str, str]]:
    """Two rows from a bench/vs_trl.py result: s/step and peak memory, tinyrl vs TRL, with their ratios."""
    vs = load(name)
    if not vs or not {"tinyrl", "trl"} <= vs["summary"].keys():
        return []
    hw = vs["hardware"].get("gpu") or f"{vs['hardware']['cpu']}, {vs['hardware']['threads']} threads"
    hw += f", TRL {vs['hardware']['trl']}"
    t, r, c = vs["summary"]["tinyrl"], vs["summary"]["trl"], vs["config"]

    def versus(key: str, unit: str = "") -> str:
        return (f"{t[key]['median']:.2f}{unit} vs {r[key]['median']:.2f}{unit} "
                f"(×{t[key]['median'] / r[key]['median']:.2f})")

    geometry = f"{what}, P={c['prompts_per_step']} G={c['group_size']}, {c['max_new_tokens']} tokens, LoRA r16"
    return [(f"s/step vs TRL GRPOTrainer, side by side ({geometry})",
             f"{versus('s_per_step')}; generation {t['generate_s']['median']:.1f} vs {r['generate_s']['median']:.1f}",
             hw, script),
            (f"{mem_label} vs TRL, same runs", versus(mem_key, " GiB"), hw, script)]


def table() -> str:
    lines = ["| what | result | hardware | script |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | `{d}` |" for a, b, c, d in rows()]
    return "\n".join(lines)


def main() -> None:
    text = open(README).read()
    i, j = text.index(START) + len(START), text.index(END)
    new = text[:i] + "\n" + table() + "\n" + text[j:]
    tmp = README + ".tmp"
    with open(tmp, "w") as f:
        f.write(new)
    os.replace(tmp, README)
    print(table())


if __name__ == "__main__":
    main()
