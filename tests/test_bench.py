"""Benches run end to end on the tiny random model: bench/learn.py in both modes (2 steps a method), recording
what its results file promises (the base eval, each method's eval, gain and curves, the settings and the
hardware), and its resumable --grid; bench/profile_gpu.py and bench/vs_trl.py in their smoke modes."""

import json
import os
import shlex
import shutil
import subprocess
import sys

import pytest


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


GRID_DIFFERS = ("date", "wall_s", "commit")  # a rerun's own: the day, its seconds, and the commit, should one land


def grid_modules():
    sys.path.insert(0, os.path.join(REPO, "bench"))
    import learn
    import learn_grid

    return learn, learn_grid


def test_learn_grid_smoke_and_a_rerun_recomputes_nothing(tmp_path, monkeypatch, capsys):
    """--grid --smoke (2 methods x 1 seed x 1 difficulty on the tiny model) stores every stage; the same command
    again trains, evaluates and samples nothing and writes the same aggregate; a stage removed from a run's
    result.json is the only one computed again. The aggregate is the record of finished work: a subset invocation
    keeps the other runs' entries; without the run folders (a fresh clone) nothing finished is computed again and
    every entry is carried over unchanged; a finished run made with other settings, or one only partly done with
    its folder gone, is computed again from scratch."""
    out, root = tmp_path / "grid.json", tmp_path / "root"
    argv = ["--grid", "--smoke", "--root", str(root), "--out", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TINYRL_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, os.path.join(REPO, "bench", "learn.py"), *argv], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    first = json.loads(out.read_text())
    assert set(first["base"]["easy"]) == {"8", "16", "diversity", "fingerprint"}
    assert first["held_out"]["budgets"] == [8, 16] and first["carried_over"] == {}
    assert set(first["runs"]) == {"easy-r1-s0", "easy-memory-r+-s0"}
    for name, run in first["runs"].items():
        assert run["steps_done"] == 2 and len(run["metrics"]) == 2 and run["shared_cpu"] is False, name
        assert set(run["curve"]) == {"1", "2"} and run["last"]["step"] == 2 and run["curve"]["1"]["n"] == 4
        assert {run["last"]["16"]["n"], run["best"]["16"]["n"]} == {4}
        assert {"distinct_1", "distinct_2", "distinct_3", "semantic"} <= set(run["diversity"])
        assert run["diversity"]["questions"] == 2 and run["diversity"]["samples"] == 3
        assert run["fingerprint"] == json.loads((root / name / "result.json").read_text())["settings"]
    paired = first["summary"]["easy"]["memory-r+"]["last@8"]["extractive_match"]["vs_r1"]
    assert set(paired) == {"0"} and "easy-memory-r+" in done.stdout.split("easy: held-out")[0]
    results = {p: p.read_text() for p in root.glob("*/result.json")}

    learn, learn_grid = grid_modules()
    monkeypatch.setenv("TINYRL_CACHE", str(tmp_path / "cache"))

    def refuse(*args, **kwargs):
        raise AssertionError("a finished stage was computed again")

    for name in ("train", "held_out", "sample_diversity"):
        monkeypatch.setattr(learn_grid, name, refuse)
    monkeypatch.setattr(learn_grid.evaluate, "load", refuse)  # nothing left to do: no model is even loaded
    learn.main(argv)
    second = json.loads(out.read_text())
    assert {k: v for k, v in second.items() if k not in GRID_DIFFERS} == \
        {k: v for k, v in first.items() if k not in GRID_DIFFERS}
    assert {p: p.read_text() for p in root.glob("*/result.json")} == results

    stored = json.loads(results[root / "easy-memory-r+-s0" / "result.json"])
    del stored["diversity"]
    (root / "easy-memory-r+-s0" / "result.json").write_text(json.dumps(stored))
    monkeypatch.undo()
    calls = []
    monkeypatch.setattr(learn_grid, "train", refuse)
    monkeypatch.setattr(learn_grid, "held_out", refuse)
    real = learn_grid.sample_diversity
    monkeypatch.setattr(learn_grid, "sample_diversity", lambda *a: calls.append(a[-1]) or real(*a))
    learn.main(argv)
    assert calls == [str(root / "easy-memory-r+-s0" / "diversity.jsonl")]
    assert set(json.loads(out.read_text())["runs"]["easy-memory-r+-s0"]["diversity"]) == \
        set(first["runs"]["easy-memory-r+-s0"]["diversity"])

    def refusing():
        monkeypatch.undo()
        monkeypatch.setenv("TINYRL_CACHE", str(tmp_path / "cache"))
        for name in ("train", "held_out", "sample_diversity"):
            monkeypatch.setattr(learn_grid, name, refuse)
        monkeypatch.setattr(learn_grid.evaluate, "load", refuse)

    def entries(results: dict) -> dict:
        return {k: results[k] for k in ("base", "runs", "summary", "settings", "held_out")}

    # a subset invocation keeps the runs it does not list (folders here)
    before, full = json.loads(out.read_text()), shlex.join(["python", "bench/learn.py", *argv])
    refusing()
    learn.main([*argv, "--methods", "r1"])
    subset = json.loads(out.read_text())
    assert entries(subset) == entries(before) and subset["carried_over"] == {"easy-memory-r+-s0": full}

    # a fresh clone: the aggregate is committed, the run folders are not; the aggregate's finished runs and base are
    # carried over unchanged (no training, no evaluation, no model loaded, no run folder made)
    shutil.rmtree(root)
    capsys.readouterr()
    learn.main(argv)
    fresh = json.loads(out.read_text())
    assert entries(fresh) == entries(before) and sorted(os.listdir(root)) == ["tiny-model"]
    assert fresh["carried_over"] == {"base-easy": subset["command"], "easy-r1-s0": subset["command"],
                                     "easy-memory-r+-s0": full}  # which command's folders each was built from
    assert capsys.readouterr().out.count("carried over, not computed again") == 3
    learn.main([*argv, "--methods", "memory-r+"])  # and a subset of it keeps the others
    assert entries(json.loads(out.read_text())) == entries(before)
    assert json.loads(out.read_text())["carried_over"] == fresh["carried_over"]

    class Started(Exception):
        pass

    def started(cfg, held_out_examples):
        assert not os.path.exists(os.path.join(cfg.out, "checkpoints"))  # from scratch
        raise Started(os.path.basename(cfg.out))

    # made with other settings: computed again
    monkeypatch.setattr(learn_grid, "train", started)
    capsys.readouterr()
    with pytest.raises(Started, match="easy-r1-s0"):
        learn.main([*argv, "--set", "lr=0.001"])
    assert f"easy-r1-s0: finished in {out} with other settings (lr), no folder: computing it again" in \
        capsys.readouterr().out
    shutil.rmtree(root / "easy-r1-s0")  # made for the training that `started` stopped

    # only partly done in the aggregate, its folder gone: starts over from scratch, and says so
    partial = json.loads(out.read_text())
    partial["runs"]["easy-memory-r+-s0"]["diversity"] = None
    out.write_text(json.dumps(partial))
    with pytest.raises(Started, match="easy-memory-r\\+-s0"):
        learn.main([*argv, "--methods", "memory-r+"])
    printed = capsys.readouterr().out
    assert "easy-memory-r+-s0: only partly done" in printed and "starting it over from scratch" in printed
    assert "base-easy: finished in" in printed  # the base is still carried over


def test_grid_diversity_and_summary_by_hand():
    """Distinct-n pools the n-grams of one question's completions; semantic diversity is the mean of 1 - cos over
    their pairs; the summary pairs each method with r1 seed by seed. (The doctests of bench/learn_grid.py too.)"""
    import doctest

    import numpy as np

    _, learn_grid = grid_modules()
    assert learn_grid.distinct_n(["x y z", "x y w"], 1) == 4 / 6  # x y z x y w: 4 unique of 6 words
    assert learn_grid.distinct_n(["x y z", "x y w"], 2) == 3 / 4  # (x y) (y z) (x y) (y w): 3 unique of 4
    assert learn_grid.distinct_n(["x y z", "x y w"], 3) == 1.0
    # unit vectors at 0, 90 and 180 degrees: distances 1, 2, 1
    assert learn_grid.mean_cosine_distance(np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])) == round(4 / 3, 4)
    assert doctest.testmod(learn_grid).failed == 0


def run_bench(tmp_path, script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TINYRL_CACHE": str(tmp_path / "cache")}
    return subprocess.run([sys.executable, os.path.join(REPO, "bench", script), *args], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=600)


def test_profile_gpu_runs_its_phases_on_cpu(tmp_path, tiny_model):
    """bench/profile_gpu.py (issue #15's GPU profile) on a CPU: every phase timed with its useful FLOPs and bytes,
    the shape-static decoding sampling exactly eager decoding's tokens; launches and card shares only on CUDA."""
    out = tmp_path / "profile.json"
    done = run_bench(tmp_path, "profile_gpu.py", "--device", "cpu", "--dtype", "fp32", "--smoke", "--model",
                     tiny_model, "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    phases = {p["phase"]: p for p in result["phases"]}
    assert list(phases) == ["generate (eager)", "generate (static)", "train (micro_batch 2)", "train (micro_batch 4)"]
    assert phases["generate (static)"]["same_tokens_as_eager"] == 1.0
    for p in phases.values():
        assert p["s"] > 0 and p["flops"] > 0 and p["bytes"] > 0 and p["launches"] is None and p["t4_estimate_s"] > 0
        assert "share_of_peak_flops" not in p
    # two micro-batches of 2 read the weights twice as often as one of 4, for the same FLOPs
    small, large = phases["train (micro_batch 2)"], phases["train (micro_batch 4)"]
    assert small["flops"] == large["flops"] and small["bytes"] == 2 * large["bytes"]
    assert result["settings"]["P"] == 2 and result["hardware"]["peak_flops"] is None


def test_vs_trl_smoke_runs_both_tools(tmp_path, tiny_model, gsm8k_dir):
    """bench/vs_trl.py end to end on the tiny model (one short run per tool), so the bench cannot rot unseen."""
    pytest.importorskip("trl")
    out = tmp_path / "vs.json"
    done = run_bench(tmp_path, "vs_trl.py", "--smoke", "--model", tiny_model, "--data", gsm8k_dir, "--prompts", "2",
                     "--group", "2", "--new-tokens", "8", "--out", str(out))
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    result = json.loads(out.read_text())
    assert set(result["summary"]) == {"tinyrl", "trl"} and result["same_prompts"]


def test_the_readme_table_shows_the_gpu_profile_only_from_a_gpu_result():
    sys.path.insert(0, os.path.join(REPO, "bench"))
    import table

    phases = [{"phase": "generate (eager)", "tokens_per_s": 1811.0, "launches": 900000, "t4_estimate_s": 30.0},
              {"phase": "generate (graph)", "tokens_per_s": 16000.0, "launches": 2000, "same_tokens_as_eager": 0.99,
               "t4_estimate_s": 9.5},
              {"phase": "train (micro_batch 8)", "s": 7.6, "share_of_peak_flops": 0.01, "t4_estimate_s": 20.0},
              {"phase": "train (micro_batch 128)", "s": 1.2, "share_of_peak_flops": 0.06, "t4_estimate_s": 8.0},
              {"phase": "train (micro_batch 128, compiled layers)", "error": "RuntimeError: x"}]
    result = {"hardware": {"device": "NVIDIA H100 80GB HBM3", "peak_flops": 989e12}, "phases": phases,
              "settings": {"model": "qwen", "dtype": "bf16", "P": 8, "G": 16, "new_tokens": 200}}
    decode, train = table.profile_rows(result)
    assert "1,811 → 16,000 tokens/s" in decode[1] and "900,000 → 2,000 launches" in decode[1]
    assert "99.0 %" in decode[1] and "T4 estimate 9.5 s" in decode[1] and decode[2] == "NVIDIA H100 80GB HBM3"
    assert train[1].startswith("micro_batch 128: 1.20 s, 6 % of peak")
    assert table.profile_rows({**result, "hardware": {"device": "cpu", "peak_flops": None}}) == []
    assert table.profile_rows(None) == []


def test_fp16_gpu_counts_a_skipped_step_as_normal_and_a_nonfinite_taken_step_as_a_failure():
    sys.path.insert(0, os.path.join(REPO, "bench"))
    from fp16_gpu import judge

    overflow_then_step = [{"loss": 0.1, "grad_norm": float("inf"), "amp/skipped": 1.0},
                          {"loss": 0.2, "grad_norm": 0.5, "amp/skipped": 0.0}]
    assert judge(overflow_then_step, {"a.lora_B": __import__("torch").ones(2)}) == {
        "ok": True, "loss_finite": True, "nonfinite_grads_only_on_skipped_steps": True, "some_step_taken": True,
        "lora_b_all_moved": True, "skipped_steps": 1}
    assert not judge([{"loss": 0.1, "grad_norm": float("nan"), "amp/skipped": 0.0}], {})["ok"]
    assert not judge([{"loss": 0.1, "grad_norm": float("inf"), "amp/skipped": 1.0}], {})["ok"]  # never stepped
    assert not judge(overflow_then_step, {"a.lora_B": __import__("torch").zeros(2)})["ok"]


def test_fp16_gpu_runs_on_cpu_without_git_and_records_each_run(tmp_path, tiny_model):
    """bench/fp16_gpu.py on a CPU (the lent GPU's copy of the tree has no .git, and maybe no git): the commit from
    $TINYRL_COMMIT, or "unknown"; never a crash."""
    out = tmp_path / "fp16.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PATH": os.path.dirname(sys.executable)}
    env.pop("TINYRL_COMMIT", None)
    done = subprocess.run([sys.executable, os.path.join(REPO, "bench", "fp16_gpu.py"), "--model", tiny_model,
                           "--out", str(out), "--quants", "none", "--smoke"], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["commit"] == "unknown" and result["runs"]["none"]["ok"], result
    sys.path.insert(0, os.path.join(REPO, "bench"))
    import hardware

    os.environ["TINYRL_COMMIT"] = "abc1234"
    try:
        assert hardware.commit() == "abc1234"
    finally:
        del os.environ["TINYRL_COMMIT"]
