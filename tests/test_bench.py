"""bench/learn.py runs end to end in both modes (the tiny random model, 2 steps a method), and records what its
results file promises: the base eval, each method's eval, gain and curves, the settings and the hardware."""

import json
import os
import subprocess
import sys


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_learn(tmp_path, *args: str) -> dict:
    out = tmp_path / "learn.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TINYRL_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, os.path.join(REPO, "bench", "learn.py"), "--smoke", "--out", str(out),
                           *args], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(out) as f:
        return json.load(f)


def check(results: dict, task: str) -> None:
    assert results["settings"]["task"] == task
    assert results["base"]["n"] == 4 and results["held_out"] == 4
    assert set(results["runs"]) == {"r1 seed 0", "memory-r+ seed 0"}
    for name, run in results["runs"].items():
        assert run["steps_done"] == 2 and len(run["metrics"]) == 2, name
        assert run["eval"]["n"] == 4
        assert run["gain_points"]["exact_match"] == round(100 * (run["eval"]["exact_match"]
                                                                 - results["base"]["exact_match"]), 1)
    assert results["hardware"]["cores"] == os.cpu_count() and "gpu" in results["hardware"]


def test_learn_cpu_mode_smoke(tmp_path):
    results = run_learn(tmp_path)
    check(results, "arith")
    assert results["settings"]["arith_ops"] == "1" and results["settings"]["few_shot"] == 1


def test_learn_gpu_mode_runs_gsm8k_at_the_papers_settings_on_cpu(tmp_path, gsm8k_dir):
    results = run_learn(tmp_path, "--gsm8k", gsm8k_dir, "--minutes", "30")
    check(results, "gsm8k")
    settings = results["settings"]
    assert settings["data"] == gsm8k_dir and settings["max_minutes"] == 30
    assert (settings["max_prompt_tokens"], settings["temperature"], settings["kl_beta"]) == (384, 0.9, 0.04)
    assert settings["quant"] == "none" and settings["explore_warmup"] == 100
    if results.get("plots"):  # beside the results file, named relative to bench/
        assert all(os.path.exists(os.path.join(REPO, "bench", p)) for p in results["plots"])
        assert all(os.path.dirname(os.path.realpath(os.path.join(REPO, "bench", p))) == os.path.realpath(tmp_path / "learn")
                   for p in results["plots"])
