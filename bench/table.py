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
    out = []
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
    vs = load("vs_trl.json")
    if vs:
        hw = f"{vs['hardware']['cpu']}, {vs['hardware']['cores']} cores, TRL {vs['hardware']['trl']}"
        t, r = vs["summary"]["tinyrl"], vs["summary"]["trl"]
        out.append(("s/step vs TRL GRPOTrainer, side by side (SmolLM2-135M, P=2 G=4, 64 tokens, LoRA r16)",
                    f"{t['s_per_step']['median']:.1f} vs {r['s_per_step']['median']:.1f} "
                    f"(×{t['s_per_step']['median'] / r['s_per_step']['median']:.2f}); generation "
                    f"{t['generate_s']['median']:.1f} vs {r['generate_s']['median']:.1f}", hw, "bench/vs_trl.py"))
        out.append(("peak RSS vs TRL, same runs", f"{t['peak_rss_gib']['median']:.2f} vs "
                    f"{r['peak_rss_gib']['median']:.2f} GiB (×{t['peak_rss_gib']['median'] / r['peak_rss_gib']['median']:.2f})",
                    hw, "bench/vs_trl.py"))
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
        errors = [abs(p["error"]) for c in budget["cases"] for p in c["phases"]
                  if p["error"] is not None and c["dtype"] == "fp32"]
        out.append(("planner: training/generation estimate vs measured (CPU, fp32, random Llama)",
                    f"within {100 * max(errors):.0f} %", budget["hardware"]["cpu"] if isinstance(
                        budget["hardware"], dict) and "cpu" in budget["hardware"] else "CPU", "bench/budget_cpu.py"))
    out += gpu_rows()
    return out


def gpu_rows() -> list[tuple[str, str, str, str]]:
    out = []
    sweep = load("budget_gpu.json")
    if sweep:
        hw = f"{sweep['hardware']['gpu']} (torch {sweep['hardware']['torch'].split('+')[0]}, CUDA {sweep['hardware']['cuda']})"
        rows = {(r["model"], r["vram"]): r for r in sweep["rows"] if "mem/device" in r["measured"]}
        names = {"qwen": "Qwen2.5-0.5B", "llama": "Llama-3.2-1B", "falcon": "Falcon3-1B"}
        for vram in ("8G", "4G"):
            got = [r for (m, v), r in rows.items() if v == vram and not r["measured"].get("same_settings_as")]
            if not got:
                continue
            cells = [f"{names[r['model']]} {r['plan']['knobs']['quant'].replace('none', '16-bit')}: "
                     f"{'fits' if r['fits'] else 'DOES NOT FIT'}, needs {r['needed_bytes'] / 2**30:.2f} GiB, "
                     f"{r['measured']['time/step']:.0f} s/step (P={r['measured']['prompts_per_step']})" for r in got]
            out.append((f"`fit --vram {vram}` under a hard {vram[:-1]} GiB cap, random-init geometries, G=16, "
                        "256+200 tokens", "; ".join(cells), hw, "bench/budget.py"))
        measured = list(rows.values())
        for key, label in (("error_generate", "generation"), ("error_train", "training")):
            ran = [r[key] for r in measured]
            now = [r["rescored"][key] for r in measured if "rescored" in r]
            cell = f"{100 * min(ran):+.0f} … {100 * max(ran):+.0f} % as run"
            if now:
                cell += f"; {100 * min(now):+.0f} … {100 * max(now):+.0f} % after calibrating on these rows"
            out.append((f"planner vs measured peak allocated, {label} phase ({len(measured)} GPU rows)", cell, hw,
                        "bench/budget.py"))
    vs = load("vs_trl_gpu.json")
    if vs and "tinyrl" in vs["summary"] and "trl" in vs["summary"]:
        hw = f"{vs['hardware']['gpu']}, TRL {vs['hardware']['trl']}"
        t, r, c = vs["summary"]["tinyrl"], vs["summary"]["trl"], vs["config"]
        out.append((f"s/step vs TRL GRPOTrainer on a GPU (Qwen2.5-0.5B geometry, bf16, P={c['prompts_per_step']} "
                    f"G={c['group_size']}, {c['max_new_tokens']} tokens)",
                    f"{t['s_per_step']['median']:.1f} vs {r['s_per_step']['median']:.1f} "
                    f"(×{t['s_per_step']['median'] / r['s_per_step']['median']:.2f}); generation "
                    f"{t['generate_s']['median']:.1f} vs {r['generate_s']['median']:.1f}", hw, "bench/vs_trl.py"))
        out.append(("CUDA peak allocated vs TRL, same runs", f"{t['cuda_allocated_gib']['median']:.2f} vs "
                    f"{r['cuda_allocated_gib']['median']:.2f} GiB (×{t['cuda_allocated_gib']['median'] / r['cuda_allocated_gib']['median']:.2f})",
                    hw, "bench/vs_trl.py --device cuda"))
    return out


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
