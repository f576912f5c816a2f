"""tinyrl.trl: Memory-R+ as TRL reward functions. The values equal tinyrl's own loop's for the same completions;
two processes keep identical memories, equal to one process over the same completions; the recipe trains."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from tinyrl import encoder, loop, memory, rewards
from tinyrl.config import Config
from tinyrl.errors import UserError
from tinyrl.trl import MemoryRewardFunctions
from tinyrl.types import Example, PromptBatch, Rollouts, Scored

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from trl_ranks import batches  # noqa: E402

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def tinyrl_own(batch: dict, enc, state: memory.MemoryState, group: int) -> dict[str, list[float]]:
    """What loop.py computes for these completions: rewards.score, then loop.remember on Rollouts."""
    texts = [c[0]["content"] for c in batch["completions"]]
    answers = [rewards.gold_answer(a) for a in batch["answer"]]
    questions = [p[0]["content"] for p in batch["prompts"]][::group]
    n = len(texts)
    examples = tuple(Example(question=q, answer=answers[i * group], index=i) for i, q in enumerate(questions))
    prompts = PromptBatch(examples=examples, texts=tuple(questions), input_ids=torch.zeros(len(questions), 1).long(),
                          attention_mask=torch.ones(len(questions), 1).long())
    rollouts = Rollouts(prompts=prompts, group_size=group, completion_ids=torch.zeros(n, 1).long(),
                        completion_mask=torch.ones(n, 1), completions=tuple(texts),
                        truncated=torch.zeros(n, dtype=torch.bool))
    components, correct = rewards.score(texts, answers, "gsm8k", "memory-r+")
    scored = Scored(components={k: torch.tensor(v) for k, v in components.items()}, correct=torch.tensor(correct))
    scored, _ = loop.remember(enc, state, rollouts, scored)
    return {k: v.tolist() for k, v in scored.components.items()}


@pytest.mark.parametrize("order", ["write-before-read", "read-before-write"])
def test_reward_values_equal_tinyrls_own_loop(order):
    settings = dict(encoder="hashing", explore_warmup=3, memory_window=8, memory_order=order, exploit_weight=0.5)
    funcs = MemoryRewardFunctions(method="memory-r+", **settings)
    assert [f.__name__ for f in funcs.reward_funcs()] == ["xml_count", "soft_format", "strict_format", "integer",
                                                          "correctness", "exploit", "explore"]
    enc = encoder.load("hashing")
    state = memory.MemoryState(memory.MemorySettings.from_config(
        Config(method="memory-r+", **settings), enc.dim))
    explored = 0.0
    for batch in batches():
        ours = {f.__name__: f(batch["prompts"], batch["completions"], answer=batch["answer"])
                for f in funcs.reward_funcs()}
        own = tinyrl_own(batch, enc, state, group=4)
        assert set(ours) == set(own)
        for name in own:
            assert ours[name] == pytest.approx(own[name], abs=1e-6), name
        explored += sum(ours["explore"])
    assert explored > 0  # explore switched on after its warm-up: the comparison covered it
    assert funcs.memory.stats() == state.stats()


def test_explore_alone_steps_the_memory_once_per_call():
    funcs = MemoryRewardFunctions(method="memory-r+", encoder="hashing", explore_warmup=1)
    explore = funcs.reward_funcs()[-1]
    batch = batches(steps=1)[0]
    explore(batch["prompts"], batch["completions"], answer=batch["answer"])
    assert funcs.memory.stats()["success_values"] + funcs.memory.stats()["failure_values"] == 16


def test_r1_has_no_memory_and_string_prompts_work():
    funcs = MemoryRewardFunctions(method="r1")
    assert funcs.memory is None and [f.__name__ for f in funcs.reward_funcs()][-1] == "correctness"
    good = "<reasoning>\n3+4\n</reasoning>\n<answer>\n7\n</answer>\n"
    assert funcs.reward_funcs()[-1](["What is 3+4?"], [good], answer=["7"]) == [1.0]


def test_misuse_is_one_line():
    with pytest.raises(UserError, match="unknown tinyrl setting"):
        MemoryRewardFunctions(memory_kk=3)
    with pytest.raises(UserError, match="unknown method"):
        MemoryRewardFunctions(method="ppo")
    with pytest.raises(UserError, match="`answer` column"):
        MemoryRewardFunctions(method="r1").reward_funcs()[0](["q"], ["c"])


def test_two_processes_keep_identical_memories_equal_to_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    script = os.path.join(HERE, "trl_ranks.py")
    done = subprocess.run([sys.executable, script, str(one)], env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "2", script, str(two)],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    single = json.loads((one / "rank0.json").read_text())
    ranks = [json.loads((two / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["digest"] == ranks[1]["digest"] == single["digest"]
    assert single["stats"]["explore_on"] == 1 and single["stats"]["success_keys"] > 0
    for step, seen in enumerate(single["steps"]):  # each rank got the rewards of its own half
        for name, values in seen["values"].items():
            assert ranks[0]["steps"][step]["values"][name] + ranks[1]["steps"][step]["values"][name] == values
        assert "memory/exploit" in seen["logged"] and "memory/explore_share" in seen["logged"]
    assert ranks[0]["saved"] == str(two / "memory") and ranks[1]["saved"] is None  # rank 0 alone writes
    assert sorted(os.listdir(two)) == ["memory", "mid", "rank0.json", "rank1.json"]
    loaded = memory.MemoryState.open(str(two / "memory"))
    assert loaded.stats()["success_keys"] == single["stats"]["success_keys"]


def recipe(tiny_model, gsm8k_dir, out, steps, *more):
    return subprocess.run([sys.executable, os.path.join(REPO, "recipes", "trl_memory_r_plus.py"),
                           "--model", tiny_model, "--data", gsm8k_dir, "--out", str(out), "--max-steps", str(steps),
                           "--prompts", "2", "--num-generations", "4", "--max-completion-length", "16",
                           "--encoder", "hashing", "--save-steps", "1", "--cpu", *more],
                          env=ENV, capture_output=True, text=True, timeout=600)


def stored(folder) -> int:
    stats = memory.MemoryState.open(str(folder)).stats()
    return stats["success_values"] + stats["failure_values"]


def test_recipe_trains_with_grpo_trainer_and_resumes_with_its_memory(tiny_model, tmp_path, gsm8k_dir):
    pytest.importorskip("trl")
    out = tmp_path / "run"
    done = recipe(tiny_model, gsm8k_dir, out, 2)
    assert done.returncode == 0, done.stderr[-3000:]
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in logged if "rewards/exploit/mean" in r]) == 2
    assert all("memory/success_keys" in r for r in logged if "rewards/exploit/mean" in r)
    assert stored(out / "checkpoint-2" / "tinyrl-memory") == 2 * 2 * 4  # 2 steps x 2 prompts x 4 completions
    assert np.isfinite([r["loss"] for r in logged if "loss" in r]).all()
    done = recipe(tiny_model, gsm8k_dir, out, 3, "--resume")  # one step more, from checkpoint-2 and its memory
    assert done.returncode == 0, done.stderr[-3000:]
    assert stored(out / "checkpoint-3" / "tinyrl-memory") == 3 * 2 * 4
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "rewards/exploit/mean" in r] == [1, 2, 3]


def test_evaluation_leaves_the_memory_alone():
    """TRL scores an eval_dataset's completions with the same functions; while its model is in eval mode (which TRL
    reads to tell evaluation from training) exploit and explore are 0 and nothing enters the memory."""
    class Trainer:  # what TRL hands the functions: its bound _log_metric, whose trainer has the model
        def __init__(self):
            self.model, self.logged = torch.nn.Linear(1, 1), []

        def _log_metric(self, name, value):
            self.logged.append(name)

    funcs = MemoryRewardFunctions(method="memory-r+", encoder="hashing", explore_warmup=1)
    trainer = Trainer()
    batch = batches(steps=1)[0]
    trainer.model.eval()
    scored = {f.__name__: f(batch["prompts"], batch["completions"], answer=batch["answer"],
                            log_metric=trainer._log_metric) for f in funcs.reward_funcs()}
    assert scored["exploit"] == scored["explore"] == [0.0] * 16 and sum(scored["correctness"]) > 0
    assert funcs.memory.stats()["success_values"] + funcs.memory.stats()["failure_values"] == 0
    assert trainer.logged == []
    trainer.model.train()
    for f in funcs.reward_funcs():
        f(batch["prompts"], batch["completions"], answer=batch["answer"], log_metric=trainer._log_metric)
    assert funcs.memory.stats()["success_values"] + funcs.memory.stats()["failure_values"] == 16
    assert trainer.logged


def test_the_recipes_help_is_instant_and_quiet():
    """`--help` reads no model stack (it took 7-12 s and printed bitsandbytes' offline kernel warning)."""
    code = ("import runpy, sys; sys.argv = ['trl_memory_r_plus.py', '--help']\n"
            "try:\n    runpy.run_path(%r, run_name='__main__')\n"
            "except SystemExit:\n    pass\n"
            "print('heavy:', sorted(m for m in ('torch', 'transformers', 'trl', 'datasets') if m in sys.modules))"
            % os.path.join(REPO, "recipes", "trl_memory_r_plus.py"))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "heavy: []" in done.stdout and "--resume" in done.stdout and not done.stderr.strip()
