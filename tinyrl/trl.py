"""Memory-R+ inside TRL: tinyrl's task rewards and episodic memory as reward functions for `trl.GRPOTrainer`.

    from tinyrl.trl import MemoryRewardFunctions
    memory = MemoryRewardFunctions(method="memory-r+", out="runs/trl-memory")
    trainer = GRPOTrainer(model=..., reward_funcs=memory.reward_funcs(), args=..., train_dataset=...,
                          callbacks=[memory.callback()])

Each function follows TRL's contract: called with `prompts`, `completions` (strings, or conversational message
lists) and the dataset's columns as keyword arguments (`answer` is the gold answer, GSM8K's "... #### 72" or a
bare number; `question`, when present, is the memory key, else the prompt's last user message); returns one float
per completion. TRL logs each under its function's name (`rewards/exploit/mean`, `rewards/explore/mean`, ...) and
sums them with weight 1, as tinyrl's own loop does, so the total reward is tinyrl's.

Several processes (accelerate, DeepSpeed, torchrun): each call gathers every rank's completions (question,
reasoning span, correctness), in rank order, and every rank encodes and applies the same events, so the memories
stay identical on every rank and equal a one-process run over the same completions in that order; each rank gets
back the rewards of its own completions. Rank 0 alone writes files; `load` continues from them on resume. The
extra is `trl` (`pip install -e ".[trl]"`).

Evaluation (an `eval_dataset`): TRL scores held-out completions with the same functions. Those must not enter the
memory (held-out answers would become exploit targets, and the memory would differ from a run without eval), so
while the trainer's model is in eval mode `exploit` and `explore` are 0 and the memory is left as it is; the task
rewards are scored as in training.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np

from tinyrl import encoder as encoder_mod
from tinyrl import memory, rewards
from tinyrl.config import Config
from tinyrl.errors import UserError

TASK_REWARDS = ("xml_count", "soft_format", "strict_format", "integer", "correctness")


def completion_text(completion: Any) -> str:
    """A completion as TRL passes it: a string, or a conversational list of messages (the assistant's content).

    >>> completion_text([{"role": "assistant", "content": "<answer>\\n7\\n</answer>"}])
    '<answer>\\n7\\n</answer>'
    """
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content") or "" for m in completion if m.get("role", "assistant") == "assistant")


def question_text(prompt: Any) -> str:
    """The memory key of a prompt: its last user message (conversational), or the prompt string itself."""
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    if not users:
        raise UserError("a conversational prompt has no user message; pass a `question` column instead")
    return users[-1]


def gold(answer: Any) -> str:
    """A dataset's answer: GSM8K's full solution ("... #### 72") or the bare answer.

    >>> gold("3 + 4 = 7\\n#### 7"), gold(" 12 ")
    ('7', '12')
    """
    text = str(answer)
    return rewards.gold_answer(text) if "####" in text else text.strip()


def rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_ranks(local: list) -> list[list]:
    """Every rank's `local`, in rank order (just [local] in one process)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [local]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    return gathered


def evaluating(kwargs: dict) -> bool:
    """Whether TRL calls the reward functions for an evaluation pass. TRL tells the two apart by its model's mode
    (`self.model.training`); the reward functions get no mode, but `log_metric` is the trainer's bound method."""
    model = getattr(getattr(kwargs.get("log_metric"), "__self__", None), "model", None)
    return model is not None and not model.training


class _Reward:
    """One named reward function (TRL logs it as rewards/<name>/mean)."""

    def __init__(self, owner: MemoryRewardFunctions, name: str):
        self.owner, self.__name__ = owner, name

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
        return self.owner.score(self.__name__, prompts, completions, **kwargs)


class MemoryRewardFunctions:
    """The reward functions of a tinyrl method for TRL, sharing one memory state (see the module's text).

    `method`: r1, cosine, memory-r or memory-r+ (memory ones add `exploit`, memory-r+ also `explore`); every other
    keyword is a tinyrl setting (`tinyrl settings`: encoder, explore_warmup, memory_k, memory_order, ...).
    `out`: where `save()` (and the callback, at every TRL checkpoint) writes the memory, on rank 0 only.
    """

    def __init__(self, method: str = "memory-r+", out: str | None = None, device: str = "cpu", **settings: Any):
        fields = {f.name for f in dataclasses.fields(Config)}
        unknown = sorted(set(settings) - fields)
        if unknown:
            raise UserError(f"unknown tinyrl setting(s) {', '.join(unknown)}; `tinyrl settings` lists them")
        self.cfg = dataclasses.replace(Config(), method=method, **settings)
        rewards.task_rewards([], [], method)  # an unknown method is one line, now
        self.out = out
        self.memory: memory.MemoryState | None = None
        self.encoder = None
        if method.startswith("memory"):
            self.encoder = encoder_mod.load(self.cfg.encoder, device)
            self.memory = memory.MemoryState(memory.MemorySettings.from_config(self.cfg, self.encoder.dim))
        self._pending: tuple[tuple, memory.MemoryRewards] | None = None  # exploit's step, for explore
        self._rows = [(0, 0)]  # this rank's rows of the last step
        self._task: tuple[tuple, dict[str, list[float]]] | None = None  # the last batch's task rewards

    def reward_funcs(self) -> list[_Reward]:
        """The task rewards, then `exploit` and `explore` as the method has them (exploit before explore)."""
        names = list(TASK_REWARDS) + (["cosine"] if self.cfg.method == "cosine" else [])
        if self.memory is not None:
            names.append("exploit")
            if self.memory.settings.explore_weight:
                names.append("explore")
        return [_Reward(self, name) for name in names]

    def score(self, name: str, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
        texts = [completion_text(c) for c in completions]
        if "answer" not in kwargs:
            raise UserError("the dataset needs an `answer` column (the gold answer) for tinyrl's rewards")
        answers = [gold(a) for a in kwargs["answer"]]
        if name not in ("exploit", "explore"):  # TRL calls each task function in turn: score the batch once
            key = (tuple(texts), tuple(answers))
            if self._task is None or self._task[0] != key:
                self._task = (key, rewards.task_rewards(texts, answers, self.cfg.method, self.cfg.numeric_match,
                                                        self.cfg.cosine_max_len))
            return self._task[1][name]
        if evaluating(kwargs):  # held-out completions: neither written to nor scored against the memory
            return [0.0] * len(texts)
        questions = [str(q) for q in kwargs["question"]] if "question" in kwargs else \
            [question_text(p) for p in prompts]
        key = (tuple(questions), tuple(texts))
        if name == "explore" and self._pending is not None and self._pending[0] == key:
            out, self._pending = self._pending[1], None
        else:
            out = self.step(questions, texts, answers)
            self._pending = (key, out) if name == "exploit" else None
            log = kwargs.get("log_metric")
            if callable(log):
                for metric, value in {**out.metrics(), **self.memory.stats()}.items():
                    log(metric if metric.startswith(("memory/", "time/")) else f"memory/{metric}", value)
        rank, _ = rank_and_world()
        mine = slice(*self._rows[rank])
        s = self.memory.settings
        values = s.exploit_weight * out.exploit if name == "exploit" else s.explore_weight * out.explore
        return [float(v) for v in values[mine]]

    def step(self, questions: list[str], texts: list[str], answers: list[str]) -> memory.MemoryRewards:
        """One memory step over every rank's completions (in rank order); remembers this rank's rows."""
        correct = rewards.correct_flags(texts, answers, numeric=self.cfg.numeric_match)
        events = all_ranks([questions, [encoder_mod.reasoning_span(t) for t in texts], correct])
        starts = np.cumsum([0] + [len(e[0]) for e in events])
        self._rows = [(int(a), int(b)) for a, b in zip(starts[:-1], starts[1:])]
        all_q = [q for e in events for q in e[0]]
        unique = list(dict.fromkeys(all_q))  # first appearance order
        vecs = self.encoder.encode(unique + [span for e in events for span in e[1]])  # [U + N, D]
        row = {q: i for i, q in enumerate(unique)}
        keys = vecs[[row[q] for q in all_q]]  # [N, D]
        return self.memory.step(all_q, keys, vecs[len(unique):], np.array([c for e in events for c in e[2]]))

    def save(self, folder: str | None = None) -> str | None:
        """Write the memory (atomically) to `folder` (default `out`/memory) on rank 0 and return it. Every other
        rank saves the same state to a private temporary folder instead (nothing in the run's folders): a save
        rebuilds the index, so all ranks keep searching the same structure and stay identical."""
        folder = folder or (os.path.join(self.out, "memory") if self.out else None)
        if self.memory is None or folder is None:
            return None
        rank, _ = rank_and_world()
        self.memory.save(folder if rank == 0 else
                         os.path.join(tempfile.gettempdir(), f"tinyrl-memory-rank{rank}-{os.getpid()}"))
        return folder if rank == 0 else None

    def load(self, folder: str) -> None:
        """Continue from a memory written by `save` or the callback (every rank reads the same files, so the
        memories stay identical); a missing or damaged one is one line."""
        if self.memory is None:
            raise UserError(f"method {self.cfg.method} keeps no memory to load")
        self.memory = memory.MemoryState.open(folder, self.memory.settings)

    def callback(self):
        """A transformers TrainerCallback that saves the memory into every TRL checkpoint folder (rank 0)."""
        from transformers import TrainerCallback

        owner = self

        class SaveMemory(TrainerCallback):
            def on_save(self, args, state, control, **kwargs):
                owner.save(os.path.join(args.output_dir, f"checkpoint-{state.global_step}", "tinyrl-memory"))

        return SaveMemory()
