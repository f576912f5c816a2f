"""Memory-R+ memories and rewards: hand-computed values, FIFO, persistence, recall, corruption. CPU, offline."""

from __future__ import annotations

import ast
import json
import os
import shutil
from collections import OrderedDict, deque
from pathlib import Path

import numpy as np
import pytest

from tinyrl.encoder import HashingEncoder
from tinyrl.errors import UserError
from tinyrl.memory import (
    MemorySettings,
    MemoryState,
    exploit_scores,
    explore_scores,
    window_normalise,
)

D = 8  # small vectors keep hand arithmetic readable; usearch is happy with any dim


def unit(*xs: float) -> np.ndarray:
    v = np.zeros(D)
    v[: len(xs)] = xs
    return v / np.linalg.norm(v)


def settings(**kw) -> MemorySettings:
    base = dict(dim=D, k=1, explore_warmup=1, window=100)
    base.update(kw)
    return MemorySettings(**base)


def run(state: MemoryState, questions, keys, values, correct):
    return state.step(list(questions), np.asarray(keys, dtype=np.float32), np.asarray(values, dtype=np.float32),
                      np.asarray(correct, dtype=bool))


# ---------------------------------------------------------------------------------------------------------------
# Pure math, by hand
# ---------------------------------------------------------------------------------------------------------------


def test_exploit_by_hand():
    a = np.array([[3.0, 4.0], [0.0, 0.0], [1.0, 1.0]])  # [3, 2]
    v = np.array([[1.0, 0.0], [3.0, 0.0], [9.0, 9.0]])  # [3, 2]
    mask = np.array([[True, True, False],  # mean (2, 0): −‖(1, 4)‖ = −√17
                     [False, False, True],  # mean (9, 9): −‖(−9, −9)‖ = −9√2
                     [False, False, False]])  # nothing recalled: 0
    scores, recalled = exploit_scores(a, v, mask)
    np.testing.assert_allclose(scores, [-np.sqrt(17), -9 * np.sqrt(2), 0.0])
    assert recalled.tolist() == [True, True, False]


def test_explore_by_hand_true_cosine_and_float64():
    a = np.array([[2.0, 0.0]])  # not unit: the true cosine must still be used (§9.7)
    v = np.array([[0.0, 5.0], [1.0, 1.0], [-1.0, 0.0]])  # cos 0, 1/√2, −1
    scores, recalled = explore_scores(a, v, np.array([[True, True, True]]))
    np.testing.assert_allclose(scores, [1 - 1 / np.sqrt(2)])
    assert recalled.tolist() == [True]
    assert explore_scores(a, v, np.zeros((1, 3), bool))[0].tolist() == [0.0]
    # Self-match: 1 − cos(a, a) in float32 is noise up to ~1e-7; in float64 it stays below the 1e-6 tolerance.
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 384)).astype(np.float32)  # [50, 384]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    self_scores = np.array([explore_scores(x[i:i + 1], x[i:i + 1].astype(np.float16), np.ones((1, 1), bool))[0][0]
                            for i in range(50)])
    assert np.all(self_scores >= 0) and np.all(self_scores < 1e-6)


def test_window_normalise_by_hand():
    # size 3: windows [1] [1 3] [1 3 2] [3 2 5] [2 5 5]
    out, hist = window_normalise([], np.array([1.0, 3.0, 2.0, 5.0, 5.0]), size=3, eps=0.0)
    np.testing.assert_allclose(out, [0.0, 1.0, 0.5, 1.0, 1.0])
    assert hist.tolist() == [2.0, 5.0, 5.0]
    # history counts: window [2 5 5 | 3.5] → (3.5 − 2) / 3; then [5 5 3.5 | 0] → 0
    out, hist = window_normalise(hist, np.array([3.5]), size=4, eps=0.0)
    np.testing.assert_allclose(out, [0.5])
    # ε: (3 − 1) / (2 + 1) = 2/3 with eps = 1
    np.testing.assert_allclose(window_normalise([1.0], np.array([3.0]), size=5, eps=1.0)[0], [2 / 3])


def test_window_degenerate_is_zero():
    assert window_normalise([], np.array([0.7]))[0].tolist() == [0.0]  # one value (§9.11: not 1.0)
    assert window_normalise([], np.array([0.7, 0.7, 0.7]))[0].tolist() == [0.0, 0.0, 0.0]
    noise = np.array([0.0, 6e-8, -6e-8, 3e-8])  # float32 noise of 1 − cos(a, a) (§9.10): never stretched to [0, 1]
    assert window_normalise([], noise)[0].tolist() == [0.0] * 4
    out, _ = window_normalise(list(noise), np.array([0.5]))  # a real score after noise: noise is the minimum
    np.testing.assert_allclose(out, [1.0], atol=1e-6)


def test_window_forgets_old_scores():
    # size 2: [10 0] → 0; [0 1] → 1: the 10 has left the window
    out, _ = window_normalise([10.0], np.array([0.0, 1.0]), size=2, eps=0.0)
    assert out.tolist() == [0.0, 1.0]


# ---------------------------------------------------------------------------------------------------------------
# The store
# ---------------------------------------------------------------------------------------------------------------


def test_value_fifo_keeps_the_newest():
    state = MemoryState(settings(max_values=3))
    vals = [unit(1, i) for i in range(5)]
    run(state, ["q"] * 5, [unit(1)] * 5, vals, [True] * 5)
    key = state.success.known("q")
    np.testing.assert_allclose(state.success.values(key), np.array(vals[2:], dtype=np.float16))
    assert state.stats()["success_values"] == 3


def test_key_fifo_evicts_oldest_and_stays_aligned(tmp_path):
    state = MemoryState(settings(max_keys=3))
    qs = ["q0", "q1", "q2"]
    keys = [unit(1, 0.1 * i) for i in range(3)]
    run(state, qs, keys, [unit(0, 1, i) for i in range(3)], [False] * 3)
    state.save(str(tmp_path / "m"))  # q0..q2 now live in the mmap'd base
    run(state, ["q3", "q4"], [unit(1, 0.3), unit(1, 0.4)], [unit(0, 1, 3), unit(0, 1, 4)], [False, False])
    mem = state.failure
    assert [mem.known(q) is None for q in ["q0", "q1", "q2", "q3", "q4"]] == [True, True, False, False, False]
    assert len(mem) == 3
    # values stay with their own question (the reference overwrote the wrong list at the first eviction)
    for q, i in (("q2", 2), ("q3", 3), ("q4", 4)):
        np.testing.assert_allclose(mem.values(mem.known(q)), [unit(0, 1, i).astype(np.float16)])
    # evicted base keys never come back from a search, before or after the next save
    for _ in range(2):
        found, _ = mem.search(np.array([unit(1, 0.0)]), 5)
        assert sorted(mem.question(int(k)) for k in found[0] if k >= 0) == ["q2", "q3", "q4"]
        state.save(str(tmp_path / "m"))
    assert len(MemoryState.open(str(tmp_path / "m")).failure) == 3


def test_known_question_is_exact_text():
    state = MemoryState(settings())
    run(state, ["What is 2+2?"], [unit(1)], [unit(0, 1)], [True])
    assert state.success.known("What is 2+2?") is not None
    assert state.success.known("What is 2+2? ") is None
    assert state.failure.known("What is 2+2?") is None
    run(state, ["What is 2+2?"], [unit(1)], [unit(0, 0, 1)], [True])  # same text: appended, no new key
    assert len(state.success) == 1 and state.success.n_values() == 2


def test_write_before_read_vs_read_before_write():
    a, b = unit(1, 0), unit(1, 1)  # cos(a, b) = 1/√2
    rewards = {}
    for order in ("write-before-read", "read-before-write"):
        state = MemoryState(settings(order=order))
        run(state, ["q"], [unit(0, 0, 1)], [a], [False])  # step 1: a failure with value a
        rewards[order] = run(state, ["q"], [unit(0, 0, 1)], [b], [False])  # step 2: another failure, value b
    # write first: b is in the memory before it is read, finds itself: 1 − cos(b, b) = 0 (§9.9)
    assert rewards["write-before-read"].explore_raw[0] < 1e-6
    # read first: only a is there: 1 − 1/√2
    np.testing.assert_allclose(rewards["read-before-write"].explore_raw[0], 1 - 1 / np.sqrt(2), atol=1e-3)
    # exploit: nothing in success either way → 0
    assert rewards["write-before-read"].exploit_raw[0] == rewards["read-before-write"].exploit_raw[0] == 0.0


def test_first_correct_completion_gets_zero_not_one():
    state = MemoryState(settings())
    r = run(state, ["q"], [unit(1)], [unit(0, 1)], [True])
    assert r.exploit_raw[0] == 0.0 and r.exploit[0] == 0.0  # finds itself, degenerate window → 0 (§9.11)


def test_micro_batch_stores_each_completion_under_its_own_question():
    state = MemoryState(settings(k=1))
    qa, qb = "Tom has 3 apples...", "A train leaves at 9..."
    ka, kb = unit(1, 0, 0), unit(0, 1, 0)
    va = [unit(0, 0, 1, i) for i in range(2)]
    vb = [unit(0, 0, 0, 1, i) for i in range(2)]
    r = run(state, [qa, qa, qb, qb], [ka, ka, kb, kb], va + vb, [True] * 4)
    np.testing.assert_allclose(state.success.values(state.success.known(qa)), np.array(va, np.float16))
    np.testing.assert_allclose(state.success.values(state.success.known(qb)), np.array(vb, np.float16))
    # the first completion of qb recalls qb's own key (its own value only), not qa's values
    assert r.exploit_raw[2] == 0.0
    np.testing.assert_allclose(r.exploit_raw[3], -np.linalg.norm(vb[1] - (vb[0] + vb[1]) / 2), atol=1e-3)


def test_explore_warmup_switches_on_at_threshold():
    state = MemoryState(settings(explore_warmup=3, order="write-before-read"))
    qs = ["q0", "q1", "q2", "q3"]
    keys = [unit(1, i) for i in range(4)]
    vals = [unit(0, 1, i) for i in range(4)]
    correct = [False, False, True, False]  # failure memory: 1 key, 2 keys, 2 keys, 3 keys at each read
    r = run(state, qs, keys, vals, correct)
    assert r.explore_on.tolist() == [False, False, False, True]
    assert r.explore[:3].tolist() == [0.0, 0.0, 0.0]
    assert len(state.windows["failure"]) == 1  # nothing entered the window during warm-up
    assert len(state.windows["success"]) == 2  # exploit has no warm-up: rows 2 and 3 recalled q2's value


def test_read_before_write_reads_the_memory_as_it_stood_at_the_start_of_the_step():
    state = MemoryState(settings(order="read-before-write"))
    run(state, ["q", "q"], [unit(1)] * 2, [unit(0, 1), unit(0, 0, 1)], [True, False])  # success s, failure f
    values = [unit(1), unit(0, -1), unit(0, 0, -1)]
    r = run(state, ["q"] * 3, [unit(1)] * 3, values, [False, True, False])
    # every read sees s = (0, 1, 0) and f = (0, 0, 1) only: −‖v − s‖ and 1 − cos(v, f)
    # (reading after the earlier writes, row 2 would get −‖v2 − mean(s, v1)‖ = −1 and 1 − cos(v2, v0) = 1)
    np.testing.assert_allclose(r.exploit_raw, [-np.sqrt(2), -2.0, -np.sqrt(2)])
    np.testing.assert_allclose(r.explore_raw, [1.0, 1.0, 2.0])


def test_read_before_write_still_recalls_a_key_evicted_during_the_step():
    state = MemoryState(settings(order="read-before-write", max_keys=1))
    run(state, ["q"], [unit(1)], [unit(0, 1)], [False])  # failure memory: q → (0, 1)
    # row 0 stores p, which evicts q; row 1 still reads the start-of-step memory, where q holds (0, 1)
    r = run(state, ["p", "q"], [unit(0, 0, 1), unit(1)], [unit(1), unit(1)], [False, True])
    np.testing.assert_allclose(r.explore_raw, [1.0, 1.0])  # 1 − cos((1, 0), (0, 1)); p's value would give 0
    assert state.failure.known("q") is None and state.failure.known("p") is not None


def test_read_before_write_rewards_follow_a_permutation_of_the_group():
    prior = (["q", "q", "q", "r"], [unit(1, 0.1)] * 3 + [unit(1, 1)],
             [unit(0, 1), unit(0, 0, 1), unit(0, 1, 1), unit(1, 0, 0, 1)], [True, False, False, False])
    values = [unit(0, 1, 2), unit(1, 1, 0, 1), unit(0, 1, 3), unit(0, 0, 1, 3)]  # rows 0 and 2: cos 0.99
    correct = [False, True, False, True]  # in-step writes to both memories, each visible to a later read of q
    perm = [3, 2, 0, 1]
    rewards = []
    for order in (range(4), perm):
        state = MemoryState(settings(k=2, order="read-before-write"))  # B_failure: the values of q and r
        run(state, *prior)
        rewards.append(run(state, ["q"] * 4, [unit(1, 0.1)] * 4, [values[i] for i in order],
                           [correct[i] for i in order]))
    np.testing.assert_array_equal(rewards[1].exploit_raw, rewards[0].exploit_raw[perm])
    np.testing.assert_array_equal(rewards[1].explore_raw, rewards[0].explore_raw[perm])


def test_read_before_write_judges_the_explore_warmup_at_the_start_of_the_step():
    state = MemoryState(settings(explore_warmup=2, order="read-before-write"))
    keys = [unit(1, i) for i in range(3)]
    # failure memory empty at the start: explore stays off all step, though it holds 2 questions before row 2 reads
    r = run(state, ["q0", "q1", "q2"], keys, [unit(0, 1, i) for i in range(3)], [False] * 3)
    assert r.explore_on.tolist() == [False, False, False]
    assert len(state.windows["failure"]) == 0
    r = run(state, ["q0"], keys[:1], [unit(0, 0, 1)], [False])  # 3 questions at the start of this step
    assert r.explore_on.tolist() == [True]
    np.testing.assert_allclose(r.explore_raw, [1.0])  # 1 − cos((0, 0, 1), (0, 1, 0))


# ---------------------------------------------------------------------------------------------------------------
# Batched step == the completions one by one (a plain sequential oracle with exact kNN)
# ---------------------------------------------------------------------------------------------------------------


class Oracle:
    """Memory-R+ as the reference runs it, one completion at a time, with exact kNN and the §9 fixes.

    write-before-read: each completion writes, then reads; read-before-write: every read of the step, then the writes.
    """

    def __init__(self, s: MemorySettings):
        self.s = s
        self.mem = {"success": OrderedDict(), "failure": OrderedDict()}  # text -> (key16, [values16])
        self.win = {"success": deque(maxlen=s.window), "failure": deque(maxlen=s.window)}

    def write(self, name, q, k16, v16):
        m = self.mem[name]
        if q not in m:
            while len(m) >= self.s.max_keys:
                m.popitem(last=False)
            m[q] = (k16, [])
        m[q][1].append(v16)
        del m[q][1][:-self.s.max_values]

    def recall(self, name, q, k16):
        items = list(self.mem[name].items())
        qv = k16.astype(np.float64)
        dist = [0.0 if t == q else 1 - kv.astype(np.float64) @ qv / np.linalg.norm(kv.astype(np.float64))
                / np.linalg.norm(qv) for t, (kv, _) in items]
        nearest = sorted(range(len(items)), key=lambda i: dist[i])[: self.s.k]  # stable: older key first on ties
        return [v for i in nearest for v in items[i][1][1]]

    def norm(self, name, r):
        self.win[name].append(r)
        lo, hi = min(self.win[name]), max(self.win[name])
        return 0.0 if hi - lo <= self.s.tol else float(np.clip((r - lo) / (hi - lo + self.s.eps), 0, 1))

    def step(self, questions, keys, values, correct):
        keys16, values16 = keys.astype(np.float16), values.astype(np.float16)
        rows = list(zip(questions, keys16, values16, correct))
        out = []
        for q, k16, v16, ok in rows:
            if self.s.order == "write-before-read":
                self.write("success" if ok else "failure", q, k16, v16)
            on = len(self.mem["failure"]) >= self.s.explore_warmup
            bs, bf = self.recall("success", q, k16), self.recall("failure", q, k16)
            a = v16.astype(np.float64)
            e_raw = -np.linalg.norm(a - np.mean(np.array(bs, np.float64), axis=0)) if bs else 0.0
            x_raw = (1 - max(float(a @ v.astype(np.float64)) / np.linalg.norm(a) / np.linalg.norm(
                v.astype(np.float64)) for v in bf)) if bf else 0.0
            e = self.norm("success", e_raw) if bs else 0.0
            x = self.norm("failure", x_raw) if (bf and on) else 0.0
            out.append((e_raw, x_raw, e, x, on))
        if self.s.order == "read-before-write":
            for q, k16, v16, ok in rows:
                self.write("success" if ok else "failure", q, k16, v16)
        return np.array(out, dtype=np.float64)


@pytest.mark.parametrize("order,k,max_keys", [("write-before-read", 1, 5), ("read-before-write", 1, 5),
                                              ("write-before-read", 3, 5), ("read-before-write", 2, 5),
                                              ("write-before-read", 2, 2), ("read-before-write", 1, 2)])
def test_batched_step_equals_sequential_oracle(tmp_path, order, k, max_keys):
    # max_keys 2 < 3 prompts per step: keys are created and evicted within one step
    s = settings(dim=32, k=k, order=order, max_keys=max_keys, max_values=3, window=7, explore_warmup=2)
    enc = HashingEncoder(dim=32)
    pool = [f"question {w} about {x}" for w, x in zip("abcdefgh", "ijklmnop")]
    rng = np.random.default_rng(k)
    state, oracle = MemoryState(s), Oracle(s)
    for step in range(8):
        prompts = rng.choice(pool, size=3, replace=False)
        questions = [str(p) for p in prompts for _ in range(4)]  # P = 3, G = 4
        keys = enc.encode(questions)  # [12, 32]
        values = rng.standard_normal((12, 32)).astype(np.float32)  # [12, 32]
        values /= np.linalg.norm(values, axis=1, keepdims=True)
        correct = rng.random(12) < 0.5
        got = state.step(questions, keys, values, correct)
        want = oracle.step(questions, keys, values, correct)
        np.testing.assert_allclose(got.exploit_raw, want[:, 0], atol=1e-9, err_msg=f"step {step}")
        np.testing.assert_allclose(got.explore_raw, want[:, 1], atol=1e-9, err_msg=f"step {step}")
        np.testing.assert_allclose(got.exploit, want[:, 2], atol=1e-9, err_msg=f"step {step}")
        np.testing.assert_allclose(got.explore, want[:, 3], atol=1e-9, err_msg=f"step {step}")
        assert got.explore_on.tolist() == want[:, 4].astype(bool).tolist()
        if step in (2, 5):  # through the disk and back, mid-run
            state.save(str(tmp_path / "mem"))
            state = MemoryState(s)  # a fresh process resuming
            state.load(str(tmp_path / "mem"))


# ---------------------------------------------------------------------------------------------------------------
# Persistence
# ---------------------------------------------------------------------------------------------------------------


def _filled_state(n_steps=4, seed=0) -> tuple[MemoryState, HashingEncoder, list[str]]:
    enc = HashingEncoder(dim=D * 4)
    state = MemoryState(settings(dim=D * 4, k=2, explore_warmup=2, max_values=5))
    pool = [f"how many {x} does {y} have" for x, y in zip(["pens", "cats", "cars", "eggs"], ["ann", "bo", "cy", "di"])]
    rng = np.random.default_rng(seed)
    for _ in range(n_steps):
        questions = [p for p in pool for _ in range(3)]
        vals = enc.encode([f"{q} step {rng.integers(100)}" for q in questions])
        state.step(questions, enc.encode(questions), vals, rng.random(len(questions)) < 0.5)
    return state, enc, pool


def test_save_load_gives_identical_search_and_rewards(tmp_path):
    state, enc, pool = _filled_state()
    state.save(str(tmp_path / "mem"))
    loaded = MemoryState.open(str(tmp_path / "mem"))
    assert loaded.stats() == state.stats()
    assert list(loaded.windows["success"]) == list(state.windows["success"])
    assert list(loaded.windows["failure"]) == list(state.windows["failure"])
    query = enc.encode(["how many pens does bo have"])[0]
    assert loaded.nearest(query, 3) == state.nearest(query, 3)
    questions = [p for p in pool for _ in range(3)]
    vals = enc.encode([f"{q} again" for q in questions])
    correct = np.arange(len(questions)) % 3 == 0
    r1 = state.step(questions, enc.encode(questions), vals, correct)
    r2 = loaded.step(questions, enc.encode(questions), vals, correct)
    for field in ("exploit_raw", "explore_raw", "exploit", "explore", "explore_on", "total"):
        np.testing.assert_array_equal(getattr(r1, field), getattr(r2, field))


def test_save_over_an_existing_save_and_keep_going(tmp_path):
    state, enc, pool = _filled_state(2)
    folder = str(tmp_path / "mem")
    state.save(folder)
    before = state.stats()
    state.step([pool[0]], enc.encode([pool[0]]), enc.encode(["new trace"]), [True])
    state.save(folder)  # replaces the folder the live base is mapped from
    assert state.stats()["success_values"] == before["success_values"] + 1
    assert MemoryState.open(folder).stats() == state.stats()
    assert not [p for p in os.listdir(tmp_path) if p != "mem"]  # no temp folders left behind


def test_saved_folder_may_be_moved_or_deleted_by_the_checkpointer(tmp_path):
    # checkpoint.save writes the memory inside a temp folder, then renames it; older checkpoints get deleted
    state, enc, pool = _filled_state(2)
    state.save(str(tmp_path / ".tmp-1" / "memory"))
    os.rename(tmp_path / ".tmp-1", tmp_path / "step-1")
    state.step([pool[1]], enc.encode([pool[1]]), enc.encode(["another trace"]), [False])
    state.save(str(tmp_path / ".tmp-2" / "memory"))
    os.rename(tmp_path / ".tmp-2", tmp_path / "step-2")
    shutil.rmtree(tmp_path / "step-1")
    assert state.nearest(enc.encode([pool[1]])[0], 1)[0].question == pool[1]
    resumed = MemoryState(state.settings)
    resumed.load(str(tmp_path / "step-2" / "memory"))
    assert resumed.stats() == state.stats()


def test_failed_resume_leaves_the_state_untouched(tmp_path):
    state, enc, pool = _filled_state(2)
    before = state.stats()
    (tmp_path / "mem").mkdir()
    (tmp_path / "mem" / "state.json").write_text("{")
    with pytest.raises(UserError):
        state.load(str(tmp_path / "mem"))
    assert state.stats() == before


@pytest.mark.parametrize("damage", ["truncate-values", "truncate-index", "flip-index", "flip-keyvecs",
                                    "garbage-state", "missing-questions", "bad-questions-json"])
def test_corrupt_memory_is_a_one_line_user_error(tmp_path, damage):
    state, _, _ = _filled_state(2)
    folder = tmp_path / "mem"
    state.save(str(folder))
    target = {"truncate-values": "success/values.npy", "truncate-index": "failure/index.usearch",
              "flip-index": "success/index.usearch", "flip-keyvecs": "failure/keyvecs.npy",
              "garbage-state": "state.json", "missing-questions": "success/questions.json",
              "bad-questions-json": "failure/questions.json"}[damage]
    path = folder / target
    data = bytearray(path.read_bytes())
    if damage.startswith("truncate"):
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif damage.startswith("flip"):
        data[len(data) - 7] ^= 0x5A
        path.write_bytes(bytes(data))
    elif damage == "garbage-state":
        path.write_bytes(bytes(data[: len(data) // 3]))
    elif damage == "missing-questions":
        path.unlink()
    else:
        path.write_text("[\"unterminated", encoding="utf-8")
    with pytest.raises(UserError) as err:
        MemoryState.open(str(folder))
    assert "\n" not in str(err.value) and str(folder) in str(err.value)


def test_structural_checks_catch_damage_even_without_checksums(tmp_path):
    state, _, _ = _filled_state(2)
    folder = tmp_path / "mem"
    state.save(str(folder))
    manifest = json.loads((folder / "state.json").read_text())
    # rewrite offsets.npy consistently sized but wrong, and make the manifest agree: only structure can tell
    bad = np.array([0, 1, 2], dtype=np.int64)
    np.save(folder / "success" / "offsets.npy", bad)
    manifest["files"]["success/offsets.npy"]["bytes"] = (folder / "success" / "offsets.npy").stat().st_size
    (folder / "state.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="counts disagree"):
        MemoryState.open(str(folder), verify=False)


def test_load_rejects_other_encoder_size(tmp_path):
    state, _, _ = _filled_state(1)
    state.save(str(tmp_path / "mem"))
    with pytest.raises(UserError, match="encoder"):
        MemoryState.open(str(tmp_path / "mem"), settings=settings(dim=384))
    with pytest.raises(UserError, match="no saved memory"):
        MemoryState.open(str(tmp_path / "nowhere"))


# ---------------------------------------------------------------------------------------------------------------
# Retrieval quality: mmap'd base + delta vs one in-RAM index vs exact search (measured, not assumed)
# ---------------------------------------------------------------------------------------------------------------


def clustered(n: int, dim: int, rng: np.random.Generator, clusters: int = 50, spread: float = 0.35) -> np.ndarray:
    """Embedding-like data: unit vectors scattered around a few random unit centres."""
    centres = rng.standard_normal((clusters, dim))  # [C, D]
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = centres[rng.integers(clusters, size=n)] + spread * rng.standard_normal((n, dim)) / np.sqrt(dim)  # [n, D]
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_base_plus_delta_matches_one_index_and_exact_search(tmp_path):
    rng = np.random.default_rng(0)
    dim, n, k = 64, 3000, 10
    data = clustered(n + 200, dim, rng)
    keys, queries = data[:n], data[n:]  # [n, D], [200, D]
    texts = [f"q{i}" for i in range(n)]
    s = MemorySettings(dim=dim, max_keys=n)
    split = MemoryState(s)
    split.success.add(texts[:2000], keys[:2000], keys[:2000])
    split.save(str(tmp_path / "mem"))  # 2000 keys in the mmap'd file
    split.success.add(texts[2000:], keys[2000:], keys[2000:])  # 1000 in the delta
    whole = MemoryState(s)
    whole.success.add(texts, keys, keys)  # all 3000 in one in-RAM index
    k16 = keys.astype(np.float16).astype(np.float64)
    sims = queries.astype(np.float64) @ (k16 / np.linalg.norm(k16, axis=1, keepdims=True)).T  # [200, n]
    exact = np.argsort(-sims, axis=1, kind="stable")[:, :k] + 1  # key ids start at 1, in insertion order
    got_split, _ = split.success.search(queries, k)
    got_whole, _ = whole.success.search(queries, k)
    recall = lambda got: np.mean([len(set(g) & set(e)) / k for g, e in zip(got, exact)])  # noqa: E731
    assert recall(got_split) >= 0.95, recall(got_split)
    assert recall(got_whole) >= 0.95, recall(got_whole)
    assert np.mean(got_split[:, 0] == exact[:, 0]) >= 0.95  # recall@1
    assert np.mean(got_split[:, 0] == got_whole[:, 0]) >= 0.95


# ---------------------------------------------------------------------------------------------------------------
# Module boundaries
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("module", ["memory", "encoder", "hub"])
def test_stage_imports_only_types_and_errors(module):  # and hub, a leaf on the standard library
    stage = Path(__file__).parents[1] / "tinyrl" / module  # a package (its files may import each other) or a file
    for path in sorted(stage.glob("*.py")) if stage.is_dir() else [stage.with_suffix(".py")]:
        tree = ast.parse(path.read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not any(n.level for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)), path  # absolute only
        names = {m for m in names if m.startswith("tinyrl") and not m.startswith(f"tinyrl.{module}.")}
        assert names <= {"tinyrl.types", "tinyrl.errors", "tinyrl.hub"}, path
