"""Memory-R+ episodic memories and their intrinsic rewards: vectors in, rewards out, no model inside.

Two memories (`success`, `failure`) map a question key (unit vector of the question text) to a FIFO list of up
to `max_values` value vectors (reasoning spans). Per step, `MemoryState.step` takes every completion's question
text, key vector, value vector and correctness, stores each completion under its **own** question (not the first
prompt's, §9.1 of docs/memory-r-plus.md) and returns per-completion rewards (§3):

    exploit = −‖a − mean(B_success)‖₂        explore = 1 − max_{v ∈ B_failure} cos(a, v)

each min-max normalised over a window of the last `window` raw scores of its memory (ε, clipped to [0, 1], 0 for
a degenerate window), explore off until the failure memory holds `explore_warmup` distinct questions.
B(M, q) is the union of the value lists of the K keys nearest to q. The whole batch is handled in one call: one
batched index search per memory, rewards vectorised per question. `write-before-read` (the reference) equals
processing the completions one by one in list order, each writing then reading; `read-before-write` reads per
step: every completion reads the memories as they stood at the start of the step (explore warm-up included), so
a GRPO group's rewards do not depend on the order of its completions, then all are written in list order. Either
way the windows take the scores in list order; tests/test_memory.py checks both against a sequential oracle.

Per step the loop calls `MemoryState.step(questions, key_vecs, value_vecs, correct)`; at a checkpoint
`state.save(folder)`; on resume `state.load(folder)`; `state.stats()` for the log.

Storage. Keys live in a usearch HNSW index (int8, cosine, connectivity 32, expansion 128 to add, 64 to search;
bench/memory.py measures the recall and latency behind these numbers). The frozen part is a file memory-mapped
read-only (`view`); keys added since the last save go to a small in-RAM delta index; evicted keys of the frozen
part are tombstones filtered out of results. Candidates from both are re-ranked by exact float64 cosine against
fp16 copies of the key vectors (int8 only picks the candidates, never their order), and a question's own key (same
text) is always at distance 0. `save` folds the delta into a new index file and swaps it in. Beside the index,
per memory: `keys.npy` (uint64 ids, oldest first), `keyvecs.npy` (fp16 [n, D]), `questions.json`, `values.npy`
(fp16 [total, D]) + `offsets.npy` ([n + 1]); `state.json` holds the settings, both reward windows and a manifest
(bytes + CRC-32 of every file). No pickle anywhere.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
import zlib
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from usearch.index import Index

from tinyrl.errors import UserError

FORMAT = "tinyrl-memory/1"
ORDERS = ("write-before-read", "read-before-write")
INDEX_FILE, KEYS_FILE, KEYVECS_FILE = "index.usearch", "keys.npy", "keyvecs.npy"
QUESTIONS_FILE, VALUES_FILE, OFFSETS_FILE, STATE_FILE = "questions.json", "values.npy", "offsets.npy", "state.json"
MEMORY_FILES = (INDEX_FILE, KEYS_FILE, KEYVECS_FILE, QUESTIONS_FILE, VALUES_FILE, OFFSETS_FILE)
NAMES = ("success", "failure")
NEVER = 2 ** 62  # an event time after every step's events


# --------------------------------------------------------------------------------------------------------------
# Pure math: arrays in, arrays out.
# _no_blas: the products here are small ([16, ~500] x [~500, 384]) and run while torch holds the cores; numpy's
# multi-threaded BLAS then stalls (measured 20-190 ms instead of 0.3 ms on 2 busy cores), so they use einsum,
# which is single-threaded and steady (~2 ms at that size).
# --------------------------------------------------------------------------------------------------------------


def exploit_scores(answers: np.ndarray, values: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Raw exploit `−‖a − mean(B)‖₂` per answer, B = the rows of `values` that `mask` selects for it.

    answers [n, D], values [R, D], mask [n, R] bool → (scores [n] float64, recalled [n] bool); an empty B gives
    score 0 and recalled False.

    >>> a = np.array([[1.0, 0.0]])
    >>> v = np.array([[0.0, 1.0], [0.0, -1.0], [1.0, 0.0]])
    >>> exploit_scores(a, v, np.array([[True, True, False]]))[0]  # mean (0, 0): −‖(1, 0)‖ = −1
    array([-1.])
    >>> exploit_scores(a, v, np.array([[False, False, False]]))
    (array([0.]), array([False]))
    """
    a = np.asarray(answers, dtype=np.float64)  # [n, D]
    v = np.asarray(values, dtype=np.float64).reshape(-1, a.shape[1])  # [R, D]
    m = np.asarray(mask, dtype=np.float64).reshape(len(a), len(v))  # [n, R]
    count = m.sum(1)  # [n]
    mean = np.einsum("nr,rd->nd", m, v) / np.maximum(count, 1.0)[:, None]  # [n, D] (einsum: see _no_blas)
    recalled = count > 0  # [n]
    return np.where(recalled, -np.linalg.norm(a - mean, axis=1), 0.0), recalled


def explore_scores(answers: np.ndarray, values: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Raw explore `1 − max_{v ∈ B} cos(a, v)` per answer, in float64 with true cosines (§9.7, §9.10).

    answers [n, D], values [R, D], mask [n, R] bool → (scores [n] float64 in [0, 2], recalled [n] bool); an
    empty B gives score 0 and recalled False.

    >>> a = np.array([[1.0, 0.0]])
    >>> v = np.array([[0.0, 2.0], [3.0, 3.0]])  # cos 0 and cos 0.7071…
    >>> float(np.round(explore_scores(a, v, np.array([[True, True]]))[0][0], 4))
    0.2929
    """
    a = np.asarray(answers, dtype=np.float64)  # [n, D]
    v = np.asarray(values, dtype=np.float64).reshape(-1, a.shape[1])  # [R, D]
    m = np.asarray(mask, dtype=bool).reshape(len(a), len(v))  # [n, R]
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-300)  # [n, D]
    v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-300)  # [R, D]
    cos = np.where(m, np.einsum("nd,rd->nr", a, v), -np.inf)  # [n, R] (einsum: see _no_blas)
    best = cos.max(1, initial=-np.inf)  # [n]
    recalled = m.any(1)  # [n]
    return np.where(recalled, np.clip(1.0 - best, 0.0, 2.0), 0.0), recalled


def window_normalise(history: Sequence[float], raw: np.ndarray, size: int = 100, eps: float = 1e-8,
                     tol: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """Push `raw` scores one by one into a window of the last `size` raw scores and min-max normalise each.

    Score j is normalised against the window that ends with it: `(r − min) / (max − min + eps)`, clipped to
    [0, 1]; 0 when the window spans less than `tol` (fewer than two distinct values, float noise included).
    history [H] (oldest first), raw [M] → (normalised [M], new history [≤ size]).

    >>> window_normalise([], np.array([5.0, 5.0, 7.0, 6.0]), size=3)[0]  # windows [5] [5 5] [5 5 7] [5 7 6]
    array([0. , 0. , 1. , 0.5])
    """
    hist = np.asarray(history, dtype=np.float64)[-size:]  # [H]
    seq = np.concatenate([hist, np.asarray(raw, dtype=np.float64)])  # [H + M]
    if len(seq) == len(hist):
        return np.zeros(0), hist
    padded = np.concatenate([np.full(size - 1, np.nan), seq])  # [size - 1 + H + M]
    windows = np.lib.stride_tricks.sliding_window_view(padded, size)[len(hist):]  # [M, size]
    lo, hi = np.nanmin(windows, axis=1), np.nanmax(windows, axis=1)  # [M]
    spread = hi - lo  # [M]
    live = spread > tol  # [M] degenerate windows give 0
    out = np.clip((seq[len(hist):] - lo) / np.where(live, spread + eps, 1.0), 0.0, 1.0)  # [M]
    return np.where(live, out, 0.0), seq[-size:]


# --------------------------------------------------------------------------------------------------------------
# One memory: keys in an index, a FIFO of values per key.
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemorySettings:
    """Everything that shapes the memories and their rewards (the loop fills it from Config)."""

    dim: int = 384  # D: key and value vector size (all-MiniLM-L6-v2: 384)
    k: int = 1  # K nearest keys recalled per completion (paper: 1 on GSM8K, 20 on AI-MO)
    max_keys: int = 10000  # keys per memory before FIFO key eviction
    max_values: int = 100  # values per key before FIFO value eviction
    window: int = 100  # raw scores kept per memory for min-max normalisation
    explore_warmup: int = 500  # explore is 0 until the failure memory holds this many distinct questions
    order: str = "write-before-read"  # each completion writes, then reads; or "read-before-write": every
    # completion reads the start-of-step memories, then all write (in-step writes never reach an in-step read)
    exploit_weight: float = 1.0  # λ_s
    explore_weight: float = 1.0  # λ_e
    eps: float = 1e-8  # ε of the min-max normalisation
    tol: float = 1e-6  # raw scores closer than this count as equal (degenerate window → 0)
    connectivity: int = 32  # HNSW edges per node (usearch default 16; 32 for recall on clustered data)
    expansion_add: int = 128  # HNSW beam width while inserting
    expansion_search: int = 32  # HNSW beam width while searching, raised to 2K + rerank for large K; with the
    # exact re-rank: recall@1 0.988 on GSM8K MiniLM keys, 0.998 on 100k clustered keys, p50 0.53 ms at 100k keys
    # (64: 0.996 / 1.0 at 0.57 ms; int8 alone stays ~0.85-0.94 at any width), see bench/results/memory.json
    rerank: int = 16  # extra index candidates fetched per query and re-ranked by exact cosine

    @classmethod
    def from_config(cls, cfg, dim: int) -> MemorySettings:
        """The memory settings of a run's Config, checked; explore is off (weight 0) unless the method is memory-r+."""
        return cls(dim=dim, k=cfg.memory_k, max_keys=cfg.memory_max_keys, max_values=cfg.memory_max_values,
                   window=cfg.memory_window, explore_warmup=cfg.explore_warmup, order=cfg.memory_order,
                   exploit_weight=cfg.exploit_weight,
                   explore_weight=cfg.explore_weight if cfg.method == "memory-r+" else 0.0).check()

    def check(self) -> MemorySettings:
        """Raise UserError for settings no run can use."""
        if self.order not in ORDERS:
            raise UserError(f"memory order {self.order!r} is unknown; choose one of {', '.join(ORDERS)}")
        for name in ("dim", "k", "max_keys", "max_values", "window", "connectivity", "expansion_add",
                     "expansion_search"):
            if getattr(self, name) < 1:
                raise UserError(f"memory setting {name} must be at least 1 (got {getattr(self, name)})")
        return self


@dataclass
class _Plan:
    """What one step writes into one memory, in completion order. Times: row j writes at 2j."""

    key_of: dict[int, int] = field(default_factory=dict)  # row -> key it writes to
    new: dict[int, int] = field(default_factory=dict)  # new key -> time it is created
    new_text: dict[int, str] = field(default_factory=dict)  # new key -> question text
    new_row: dict[int, int] = field(default_factory=dict)  # new key -> row whose key vector it uses
    evicted: dict[int, int] = field(default_factory=dict)  # key -> time it is evicted (FIFO)
    appends: dict[int, list[int]] = field(default_factory=dict)  # key -> rows appending a value, in order


def search_width(settings: MemorySettings) -> int:
    """HNSW beam while searching: expansion_search, widened for large K so recall@K holds (K=20: 56).

    >>> search_width(MemorySettings(k=1)), search_width(MemorySettings(k=20))
    (32, 56)
    """
    return max(settings.expansion_search, 2 * settings.k + settings.rerank)


class Memory:
    """One episodic memory: question keys (usearch: mmap'd base file + RAM delta) and a FIFO of values per key.

    State = the frozen part (the last save, read-only arrays mapped from its files) + an overlay of what changed
    since (new keys, changed value lists, evicted keys). `save` folds the overlay into new files.
    """

    def __init__(self, settings: MemorySettings):
        self.settings = settings
        d = settings.dim
        # frozen part: rows in key order (ascending key = oldest first); values of row i: offsets[i]:offsets[i+1]
        self._base: Index | None = None  # read-only view of the saved index
        self._f_keys = np.zeros(0, dtype=np.uint64)  # [n]
        self._f_vecs = np.zeros((0, d), dtype=np.float16)  # [n, D]
        self._f_values = np.zeros((0, d), dtype=np.float16)  # [V, D]
        self._f_offsets = np.zeros(1, dtype=np.int64)  # [n + 1]
        self._f_questions: bytes | None = None  # questions.json, parsed on first need
        # live state
        self._live: OrderedDict[int, str] | None = OrderedDict()  # key -> question, oldest first; None = not parsed
        self._by_text: dict[str, int] = {}  # question -> live key
        self._vecs: dict[int, np.ndarray] = {}  # key -> [D] fp16, keys created since the save
        self._vals: dict[int, np.ndarray] = {}  # key -> [n, D] fp16, value lists changed since the save
        self._count = 0  # live keys
        self._n_values = 0  # values over all live keys
        self._next_key = 1  # keys are never reused, so FIFO order = key order
        self._delta = self._new_index()  # keys created since the save
        self._delta_keys: list[int] = []
        self._tombstones: set[int] = set()  # keys evicted since the save (still in base or delta)

    def _new_index(self) -> Index:
        return Index(ndim=self.settings.dim, metric="cos", dtype="i8", connectivity=self.settings.connectivity,
                     expansion_add=self.settings.expansion_add, expansion_search=search_width(self.settings))

    # -- reading -----------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._count

    def n_values(self) -> int:
        """Stored values over all keys."""
        return self._n_values

    @property
    def live(self) -> OrderedDict[int, str]:
        """Live keys -> question text, oldest first (parsed from the saved questions.json on first use)."""
        if self._live is None:
            try:
                questions = json.loads(self._f_questions)
            except ValueError:
                questions = None
            if not isinstance(questions, list) or len(questions) != len(self._f_keys):
                raise UserError(f"memory {QUESTIONS_FILE} is corrupt or truncated; restore the checkpoint folder "
                                f"or start a new run without resuming")
            self._live = OrderedDict(zip(self._f_keys.tolist(), questions))
            self._by_text = {q: k for k, q in self._live.items()}
            self._f_questions = None
        return self._live

    def known(self, question: str) -> int | None:
        """The key stored for exactly this question text, or None."""
        self.live  # noqa: B018 (parses the saved texts on first use, which fills _by_text)
        return self._by_text.get(question)

    def question(self, key: int) -> str:
        return self.live[key]

    def values(self, key: int) -> np.ndarray:
        """[n, D] fp16 values of a live `key`, oldest first (n ≤ max_values)."""
        if key in self._vals:
            return self._vals[key]
        row = int(np.searchsorted(self._f_keys, key))
        start, end = self._f_offsets[row], self._f_offsets[row + 1]
        return self._f_values[max(start, end - self.settings.max_values):end]

    def key_vectors(self, keys: np.ndarray) -> np.ndarray:
        """[C, D] fp16 stored key vectors of live `keys` [C]."""
        keys = np.asarray(keys, dtype=np.int64)  # [C]
        frozen = keys < (int(self._f_keys[-1]) + 1 if len(self._f_keys) else 0)  # [C] keys of the last save
        out = np.empty((len(keys), self.settings.dim), dtype=np.float16)  # [C, D]
        out[frozen] = self._f_vecs[np.searchsorted(self._f_keys, keys[frozen].astype(np.uint64))]
        for i in np.flatnonzero(~frozen).tolist():  # created since the save
            out[i] = self._vecs[int(keys[i])]
        return out

    def search(self, queries: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
        """The `count` nearest live keys to each query: approximate index search, exact float64 re-rank.

        queries [Q, D] → (keys [Q, count] int64, −1 where fewer exist; distances [Q, count] float64 cosine
        distance, inf where missing), sorted by (distance, key).
        """
        q = np.asarray(queries, dtype=np.float32).reshape(-1, self.settings.dim)  # [Q, D]
        keys = np.full((len(q), count), -1, dtype=np.int64)  # [Q, count]
        dists = np.full((len(q), count), np.inf)  # [Q, count]
        if not len(q) or not len(self) or count < 1:
            return keys, dists
        for row, cand in enumerate(self._candidates(q, count)):
            d = self._distances(q[row], cand)  # [C]
            top = np.lexsort((cand, d))[:count]
            keys[row, :len(top)], dists[row, :len(top)] = cand[top], d[top]
        return keys, dists

    def _candidates(self, q: np.ndarray, count: int) -> list[np.ndarray]:
        """At least `count` (+ `rerank`) live keys near each query [Q, D], from base and delta.

        Keys evicted since the save stay in the indexes until the next one, so they are filtered out here;
        while they hide too many results, the search is repeated with twice the count.
        """
        indexes = [ix for ix in (self._base, self._delta) if ix is not None and len(ix)]
        total = sum(len(ix) for ix in indexes)
        fetch = count + self.settings.rerank
        threads = 1 if len(q) < 64 else 0  # thread start-up costs more than a few queries
        while True:
            found = [[] for _ in range(len(q))]
            for ix in indexes:
                matches = ix.search(q, min(fetch, len(ix)), threads=threads)
                if len(q) == 1:  # usearch returns Matches, not BatchMatches, for a single query
                    found[0].append(np.asarray(matches.keys[:len(matches)], dtype=np.int64))
                    continue
                for row in range(len(q)):
                    found[row].append(matches.keys[row, :matches.counts[row]].astype(np.int64))
            out = [np.concatenate(f) for f in found]  # base and delta never share a key
            if self._tombstones:
                out = [c[[int(k) not in self._tombstones for k in c]] for c in out]
            if fetch >= total or all(len(c) >= min(count, len(self)) for c in out):
                return out
            fetch = min(2 * fetch, total)

    def _distances(self, query: np.ndarray, keys: np.ndarray) -> np.ndarray:
        """Exact cosine distance (float64) from one query [D] to stored keys [C]."""
        if not len(keys):
            return np.zeros(0)
        k = self.key_vectors(keys).astype(np.float64)  # [C, D]
        q = np.asarray(query, dtype=np.float64)  # [D]
        cos = k @ q / np.maximum(np.linalg.norm(k, axis=1) * np.linalg.norm(q), 1e-300)  # [C]
        return 1.0 - cos

    # -- writing -----------------------------------------------------------------------------------------------

    def plan(self, questions: Sequence[str], rows: Sequence[int]) -> _Plan:
        """Which key each row writes to, which keys are created and which are evicted (FIFO), in row order.

        Pure: the memory is not changed (see `commit`).
        """
        plan = _Plan()
        by_text: dict[str, int] = {}  # texts whose key this step created
        fifo = iter(self.live)  # pre-step keys, oldest first, then the keys this step creates
        created: deque[int] = deque()
        live, next_key = len(self), self._next_key
        for j in rows:
            text = questions[j]
            key = by_text.get(text, self._by_text.get(text))
            if key is None or key in plan.evicted:
                while live >= self.settings.max_keys:  # FIFO: the oldest live key goes
                    oldest = next(fifo, None)
                    oldest = created.popleft() if oldest is None else oldest
                    plan.evicted[oldest] = 2 * j
                    if oldest in plan.new and by_text.get(plan.new_text[oldest]) == oldest:
                        del by_text[plan.new_text[oldest]]
                    live -= 1
                key, next_key, live = next_key, next_key + 1, live + 1
                by_text[text] = key
                created.append(key)
                plan.new[key], plan.new_text[key], plan.new_row[key] = 2 * j, text, j
            plan.key_of[j] = key
            plan.appends.setdefault(key, []).append(j)
        return plan

    def commit(self, plan: _Plan, keys16: np.ndarray, values16: np.ndarray) -> None:
        """Apply a plan: add the new keys to the delta index, evict, append values (FIFO over max_values).

        keys16 [N, D] fp16, values16 [N, D] fp16: the step's vectors, indexed by row.
        """
        live = self.live
        for key in plan.new:
            live[key] = plan.new_text[key]
            self._by_text[plan.new_text[key]] = key
            self._vecs[key] = keys16[plan.new_row[key]]  # [D]
            self._vals[key] = values16[:0]  # [0, D]
        self._count += len(plan.new)
        survivors = [k for k in plan.new if k not in plan.evicted]
        if survivors:
            vecs = np.stack([self._vecs[k] for k in survivors]).astype(np.float32)  # [n_new, D]
            self._delta.add(np.array(survivors, dtype=np.uint64), vecs, threads=1 if len(survivors) < 64 else 0)
            self._delta_keys.extend(survivors)
        self._next_key += len(plan.new)
        for key, rows in plan.appends.items():
            if key in plan.evicted:
                continue
            old = self.values(key)  # [n, D]
            self._vals[key] = np.concatenate([old, values16[rows]])[-self.settings.max_values:]  # [≤ max_values, D]
            self._n_values += len(self._vals[key]) - len(old)
        for key in plan.evicted:
            if key not in plan.new:  # a key created and evicted in the same step never reached an index
                self._n_values -= len(self.values(key))
                self._tombstones.add(key)
            text = live.pop(key)
            if self._by_text.get(text) == key:
                del self._by_text[text]
            self._vecs.pop(key, None)
            self._vals.pop(key, None)
        self._count -= len(plan.evicted)

    def add(self, questions: Sequence[str], key_vecs: np.ndarray, value_vecs: np.ndarray) -> None:
        """Store value_vecs[i] under questions[i] for every row, in order (no rewards; for tools and tests).

        key_vecs [N, D], value_vecs [N, D].
        """
        plan = self.plan(questions, range(len(questions)))
        self.commit(plan, np.asarray(key_vecs, dtype=np.float16), np.asarray(value_vecs, dtype=np.float16))

    # -- disk --------------------------------------------------------------------------------------------------

    def write(self, folder: str) -> None:
        """Write this memory to a new `folder`: the delta folded into a fresh index file, plus the sidecars."""
        os.makedirs(folder)
        if self._base is None:  # nothing frozen yet: the delta already holds every key
            index, pending = self._delta.copy(), []
        else:  # a mutable RAM copy of the frozen part, plus the delta's live keys
            index, pending = self._base.copy(), [k for k in self._delta_keys if k not in self._tombstones]
        gone = [k for k in self._tombstones if index.contains(k)]
        if gone:
            index.remove(np.array(gone, dtype=np.uint64))
        if pending:
            vecs = np.stack([self._vecs[k] for k in pending]).astype(np.float32)  # [n_delta, D]
            index.add(np.array(pending, dtype=np.uint64), vecs)
        if len(index) != len(self):
            raise RuntimeError(f"memory fold produced {len(index)} keys, expected {len(self)}")
        index.save(os.path.join(folder, INDEX_FILE))
        keys = np.fromiter(self.live, dtype=np.uint64, count=len(self))  # [n]
        lists = [self.values(int(k)) for k in keys]
        values = np.concatenate(lists) if lists else np.zeros((0, self.settings.dim), dtype=np.float16)  # [V, D]
        offsets = np.concatenate([[0], np.cumsum([len(v) for v in lists], dtype=np.int64)])  # [n + 1]
        keyvecs = self.key_vectors(keys) if len(keys) else np.zeros((0, self.settings.dim), dtype=np.float16)  # [n, D]
        np.save(os.path.join(folder, KEYS_FILE), keys)
        np.save(os.path.join(folder, KEYVECS_FILE), keyvecs.astype(np.float16))
        np.save(os.path.join(folder, VALUES_FILE), values.astype(np.float16))
        np.save(os.path.join(folder, OFFSETS_FILE), offsets.astype(np.int64))
        with open(os.path.join(folder, QUESTIONS_FILE), "w", encoding="utf-8") as f:
            json.dump(list(self.live.values()), f, ensure_ascii=False)

    def attach(self, folder: str, next_key: int, questions: list[str] | None = None) -> None:
        """Make the files in `folder` this memory's frozen part: index viewed (mmap), arrays mmap'd.

        Cheap and independent of the memory size except for vectorised checks: the question texts are parsed
        on first use unless given. Every size is cross-checked; anything inconsistent raises UserError.
        """
        def bad(what: str) -> UserError:
            return UserError(f"memory {folder} is corrupt or truncated ({what}); restore the checkpoint folder "
                             f"or start a new run without resuming")

        try:
            index = Index.restore(os.path.join(folder, INDEX_FILE), view=True)
            keys = np.load(os.path.join(folder, KEYS_FILE), mmap_mode="r")  # [n] uint64
            keyvecs = np.load(os.path.join(folder, KEYVECS_FILE), mmap_mode="r")  # [n, D] fp16
            values = np.load(os.path.join(folder, VALUES_FILE), mmap_mode="r")  # [V, D] fp16
            offsets = np.load(os.path.join(folder, OFFSETS_FILE))  # [n + 1] int64
            with open(os.path.join(folder, QUESTIONS_FILE), "rb") as f:
                raw_questions = f.read() if questions is None else None
        except (OSError, ValueError, RuntimeError) as err:
            raise bad(f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None
        if index is None:
            raise bad(f"{INDEX_FILE} is not a usearch index")
        n, d = len(keys), self.settings.dim
        if keyvecs.dtype != np.float16 or values.dtype != np.float16 or keys.dtype != np.uint64 or keys.ndim != 1:
            raise bad("unexpected array types")
        if index.ndim != d or keyvecs.shape != (n, d) or values.ndim != 2 or values.shape[1] != d:
            raise bad(f"vector sizes differ from the {d}-d encoder")
        if (len(index) != n or offsets.shape != (n + 1,) or offsets[0] != 0 or offsets[-1] != len(values)
                or np.any(np.diff(offsets) < 0) or (questions is not None and len(questions) != n)):
            raise bad("key, question, value and index counts disagree")
        if n and (np.any(np.diff(keys.astype(np.int64)) <= 0) or int(keys[-1]) >= next_key
                  or not bool(np.all(index.contains(np.asarray(keys))))):
            raise bad("index keys do not match keys.npy")
        index.expansion_search = search_width(self.settings)
        index.expansion_add = self.settings.expansion_add
        self._base, self._f_offsets = index, offsets
        # plain ndarray views of the maps: same pages, faster slicing than np.memmap objects
        self._f_keys, self._f_vecs, self._f_values = np.asarray(keys), np.asarray(keyvecs), np.asarray(values)
        self._f_questions = raw_questions
        self._live = None if questions is None else OrderedDict(zip(keys.tolist(), questions))
        self._by_text = {} if questions is None else {q: k for k, q in self._live.items()}
        self._vecs, self._vals = {}, {}
        self._count = n
        self._n_values = int(np.minimum(np.diff(offsets), self.settings.max_values).sum())
        self._next_key = next_key
        self._delta, self._delta_keys, self._tombstones = self._new_index(), [], set()


# --------------------------------------------------------------------------------------------------------------
# Both memories, both windows: the per-step entry point and persistence.
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryRewards:
    """Per-completion memory rewards of one step (N = P*G completions, in the loop's order)."""

    exploit_raw: np.ndarray  # [N] float64, −‖a − mean(B_success)‖ (0 where nothing was recalled)
    explore_raw: np.ndarray  # [N] float64, 1 − max cos(a, B_failure) (0 where nothing was recalled), during
    # warm-up too: only `explore` is held at 0 while explore is off
    exploit: np.ndarray  # [N] float64 in [0, 1], window-normalised
    explore: np.ndarray  # [N] float64 in [0, 1], window-normalised, 0 while explore is off
    explore_on: np.ndarray  # [N] bool, failure memory past its warm-up when this completion read it
    total: np.ndarray  # [N] float64, exploit_weight · exploit + explore_weight · explore
    timing_ms: dict[str, float]  # plan, search, reward, write, total

    def metrics(self) -> dict[str, float]:
        """The step's means, for the log (docs/metrics.md: memory/*)."""
        return {"memory/exploit_raw": float(self.exploit_raw.mean()), "memory/exploit": float(self.exploit.mean()),
                "memory/explore_raw": float(self.explore_raw.mean()), "memory/explore": float(self.explore.mean()),
                "memory/explore_share": float(np.mean(self.explore_on)),
                "time/memory_recall_ms": self.timing_ms["search"]}


@dataclass(frozen=True)
class Neighbour:
    """One stored question near a query, for `tinyrl memory inspect`."""

    memory: str  # "success" or "failure"
    key: int
    question: str
    distance: float  # cosine distance, exact
    values: int  # stored values (reasoning traces) under this key


class MemoryState:
    """The success and failure memories plus their two reward windows: all the memory state of a run."""

    def __init__(self, settings: MemorySettings | None = None):
        self.settings = (settings or MemorySettings()).check()
        self.memories = {name: Memory(self.settings) for name in NAMES}
        self.windows = {name: deque(maxlen=self.settings.window) for name in NAMES}  # raw scores, oldest first
        self.folder: str | None = None  # where the last save or load was (the caller may move it since)
        self.disk_bytes = 0  # bytes of the files of the last save or load

    @property
    def success(self) -> Memory:
        return self.memories["success"]

    @property
    def failure(self) -> Memory:
        return self.memories["failure"]

    def step(self, questions: Sequence[str], key_vecs: np.ndarray, value_vecs: np.ndarray,
             correct: np.ndarray) -> MemoryRewards:
        """Store every completion in its memory and return the memory rewards of all of them.

        questions [N]: each completion's own question text; key_vecs [N, D]: the embedding of that question
        (repeat the P question embeddings G times); value_vecs [N, D]: the embedding of each completion's
        reasoning span; correct [N] bool: which memory each completion is written to.
        Gives what handling the completions one at a time in list order would (write then read), or, for
        read-before-write, all reading the start-of-step memories and then all writing in list order; with the
        index's approximate search (re-ranked exactly) in place of exact kNN.
        """
        t0 = time.perf_counter()
        s = self.settings
        n = len(questions)
        correct = np.asarray(correct, dtype=bool).reshape(-1)  # [N]
        keys16 = np.asarray(key_vecs, dtype=np.float16)  # [N, D]
        values16 = np.asarray(value_vecs, dtype=np.float16)  # [N, D]
        if keys16.shape != (n, s.dim) or values16.shape != (n, s.dim) or correct.shape != (n,):
            raise ValueError(f"step expects {n} questions, key/value vectors [{n}, {s.dim}] and {n} flags; got "
                             f"{keys16.shape}, {values16.shape}, {correct.shape}")
        writers = {"success": np.flatnonzero(correct), "failure": np.flatnonzero(~correct)}
        plans = {name: self.memories[name].plan(questions, writers[name]) for name in NAMES}
        # Completion i writes at time 2i and reads at 2i + 1 (write first) or at −1, before every write (read first).
        read_t = 2 * np.arange(n) + 1 if s.order == "write-before-read" else np.full(n, -1)  # [N]
        t1 = time.perf_counter()

        groups: dict[str, list[int]] = {}  # question text -> rows asking it, in order
        for i, text in enumerate(questions):
            groups.setdefault(text, []).append(i)
        queries = keys16[[rows[0] for rows in groups.values()]]  # [U, D]
        recalls = {name: self._recall(name, plans[name], list(groups), queries, keys16) for name in NAMES}
        t2 = time.perf_counter()

        raw, got = {}, {}
        for name, score in (("success", exploit_scores), ("failure", explore_scores)):
            raw[name], got[name] = np.zeros(n), np.zeros(n, dtype=bool)  # [N], [N]
            for text, rows in groups.items():
                values, mask = self._gather(name, plans[name], recalls[name][text], read_t[rows], values16)
                raw[name][rows], got[name][rows] = score(values16[rows], values, mask)  # [n_u], [n_u]
        explore_on = self._keys_at("failure", plans["failure"], read_t) >= s.explore_warmup  # [N]
        normalised = {}
        for name, use in (("success", got["success"]), ("failure", got["failure"] & explore_on)):
            normalised[name] = np.zeros(n)  # [N]
            scores, history = window_normalise(self.windows[name], raw[name][use], s.window, s.eps, s.tol)
            normalised[name][use] = scores
            self.windows[name] = deque(history.tolist(), maxlen=s.window)
        t3 = time.perf_counter()

        for name in NAMES:
            self.memories[name].commit(plans[name], keys16, values16)
        t4 = time.perf_counter()
        ms = {"plan": t1 - t0, "search": t2 - t1, "reward": t3 - t2, "write": t4 - t3, "total": t4 - t0}
        return MemoryRewards(
            exploit_raw=raw["success"], explore_raw=raw["failure"], exploit=normalised["success"],
            explore=normalised["failure"], explore_on=explore_on,
            total=s.exploit_weight * normalised["success"] + s.explore_weight * normalised["failure"],
            timing_ms={k: 1e3 * v for k, v in ms.items()})

    def _recall(self, name: str, plan: _Plan, texts: list[str], queries: np.ndarray,
                keys16: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Candidate keys per question: index hits in the pre-step memory, plus every key this step creates.

        queries [U, D] (one per distinct text), keys16 [N, D]. A key holding the same text as the query is at
        distance 0. Over-fetching by the number of keys this step evicts keeps K visible candidates for every
        read. Returns text -> (keys [C] int64, distances [C] float64), sorted by (distance, key).
        """
        memory = self.memories[name]
        evicted_before = sum(1 for key in plan.evicted if key not in plan.new)
        hits, hit_dist = memory.search(queries, self.settings.k + evicted_before)  # [U, k+e], [U, k+e]
        new = np.array(list(plan.new), dtype=np.int64)  # [n_new]
        new_vecs = keys16[[plan.new_row[int(k)] for k in new]].astype(np.float64)  # [n_new, D]
        new_vecs /= np.maximum(np.linalg.norm(new_vecs, axis=1, keepdims=True), 1e-300)
        out = {}
        for u, text in enumerate(texts):
            keys, dist = list(hits[u][hits[u] >= 0]), list(hit_dist[u][hits[u] >= 0])
            own = memory.known(text)
            if own is not None and own not in keys:  # never lose a known question to an approximate search
                keys.append(own)
                dist.append(0.0)
            q = queries[u].astype(np.float64)  # [D]
            new_dist = 1.0 - new_vecs @ (q / max(np.linalg.norm(q), 1e-300))  # [n_new]
            new_dist[[plan.new_text[int(k)] == text for k in new]] = 0.0
            keys = np.concatenate([np.array(keys, dtype=np.int64), new])  # [C]
            dist = np.concatenate([np.array(dist, dtype=np.float64), new_dist])  # [C]
            dist[[memory.live.get(int(k)) == text for k in keys]] = 0.0
            order = np.lexsort((keys, dist))
            out[text] = (keys[order], dist[order])
        return out

    def _gather(self, name: str, plan: _Plan, recall: tuple[np.ndarray, np.ndarray], read_t: np.ndarray,
                values16: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The value rows each read sees: K nearest keys visible at its time, each key's last max_values values.

        recall: (keys [C], distances [C]) sorted; read_t [n_u] read times; values16 [N, D] the step's values.
        Returns (values [R, D] fp16, mask [n_u, R] bool): row r is in completion i's B when mask[i, r].
        """
        memory, k, cap = self.memories[name], self.settings.k, self.settings.max_values
        keys = recall[0]  # [C]
        created = np.array([plan.new.get(c, -NEVER) for c in keys.tolist()])  # [C] pre-step keys: long ago
        evicted = np.array([plan.evicted.get(c, NEVER) for c in keys.tolist()])  # [C]
        t = read_t[:, None]  # [n_u, 1]
        visible = (created[None, :] < t) & (t < evicted[None, :])  # [n_u, C]
        chosen = visible & (np.cumsum(visible, axis=1) <= k)  # [n_u, C] the K nearest visible keys
        blocks, masks = [], []
        for c in np.flatnonzero(chosen.any(0)):
            key = int(keys[c])
            stored = memory.values(key) if key not in plan.new else values16[:0]  # [s, D]
            rows = plan.appends.get(key, [])
            ext = np.concatenate([stored, values16[rows]])  # [s + a, D] oldest first
            end = len(stored) + np.searchsorted(2 * np.array(rows, dtype=np.int64), read_t)  # [n_u]
            start = np.maximum(end - cap, 0)  # [n_u]
            pos = np.arange(len(ext))  # [L]
            masks.append(chosen[:, c, None] & (pos >= start[:, None]) & (pos < end[:, None]))  # [n_u, L]
            blocks.append(ext)
        if not blocks:
            return values16[:0], np.zeros((len(read_t), 0), dtype=bool)
        return np.concatenate(blocks), np.concatenate(masks, axis=1)

    def _keys_at(self, name: str, plan: _Plan, read_t: np.ndarray) -> np.ndarray:
        """Distinct questions the memory holds at each read time [N] → [N] int."""
        created = np.sort(np.array(list(plan.new.values()), dtype=np.int64))
        evicted = np.sort(np.array(list(plan.evicted.values()), dtype=np.int64))
        return (len(self.memories[name]) + np.searchsorted(created, read_t)
                - np.searchsorted(evicted, read_t))

    # -- persistence -------------------------------------------------------------------------------------------

    def save(self, folder: str) -> None:
        """Write both memories and windows to `folder` atomically, then continue from the files written.

        Everything goes to a temporary sibling folder first (delta folded into new index files, checksums in
        state.json, fsynced), which then replaces `folder` by rename. Afterwards this state views the new files,
        exactly as `MemoryState.load(folder)` would.
        """
        folder = os.path.abspath(folder)
        parent = os.path.dirname(folder)
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".{os.path.basename(folder)}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            os.makedirs(tmp)
            for name in NAMES:
                self.memories[name].write(os.path.join(tmp, name))
            files = {f"{name}/{file}": _file_info(os.path.join(tmp, name, file))
                     for name in NAMES for file in MEMORY_FILES}
            state = {"format": FORMAT, "settings": asdict(self.settings),
                     "next_key": {name: self.memories[name]._next_key for name in NAMES},
                     "windows": {name: list(self.windows[name]) for name in NAMES}, "files": files}
            with open(os.path.join(tmp, STATE_FILE), "w", encoding="utf-8") as f:
                json.dump(state, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            _fsync_dir(tmp, [os.path.join(tmp, name) for name in NAMES])
            if os.path.exists(folder):  # replace an older save: two renames, the old one deleted after
                old = f"{tmp}.old"
                os.rename(folder, old)
                os.rename(tmp, folder)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, folder)
            _fsync_dir(parent, [])
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for name in NAMES:
            memory = self.memories[name]
            memory.attach(os.path.join(folder, name), state["next_key"][name], list(memory.live.values()))
        self.folder, self.disk_bytes = folder, sum(info["bytes"] for info in files.values())

    def load(self, folder: str, verify: bool = True) -> None:
        """Resume: replace this state, in place, by the one saved in `folder` (this state's settings are kept).

        Nothing changes unless the whole folder reads back intact (see `open`).
        """
        loaded = MemoryState.open(folder, settings=self.settings, verify=verify)
        self.memories, self.windows = loaded.memories, loaded.windows
        self.folder, self.disk_bytes = loaded.folder, loaded.disk_bytes

    @classmethod
    def open(cls, folder: str, settings: MemorySettings | None = None, verify: bool = True) -> MemoryState:
        """A saved state: indexes memory-mapped, values mmap'd, windows restored.

        `settings` None uses the saved ones (e.g. for `tinyrl memory inspect`); given, its `dim` must match.
        `verify` checks every file's CRC-32 (reads each file once); sizes and structure are always checked.
        Any damage raises a one-line UserError.
        """
        folder = os.path.abspath(folder)
        path = os.path.join(folder, STATE_FILE)
        damaged = UserError(f"memory state {path} is corrupt or truncated; restore the checkpoint folder or start "
                            f"a new run without resuming")
        try:
            with open(path, encoding="utf-8") as f:
                state = json.load(f)
            if state.get("format") != FORMAT:
                raise UserError(f"memory at {folder} has format {state.get('format')!r}; this tinyrl reads {FORMAT}")
            saved = MemorySettings(**state["settings"])
            files = {rel: (int(info["bytes"]), int(info["crc32"])) for rel, info in state["files"].items()}
            next_key = {name: int(state["next_key"][name]) for name in NAMES}
            windows = {name: [float(x) for x in state["windows"][name]] for name in NAMES}
        except FileNotFoundError:
            raise UserError(f"no saved memory at {folder} ({STATE_FILE} is missing)") from None
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise damaged from None
        if set(files) != {f"{name}/{file}" for name in NAMES for file in MEMORY_FILES}:
            raise damaged
        settings = (settings or saved).check()
        if settings.dim != saved.dim:
            raise UserError(f"memory at {folder} holds {saved.dim}-d vectors but the encoder gives "
                            f"{settings.dim}-d; resume with the encoder it was built with")
        for rel, (size, crc) in files.items():
            full = os.path.join(folder, rel)
            found = os.path.getsize(full) if os.path.isfile(full) else -1
            if found != size or (verify and _crc32(full) != crc):
                what = "missing" if found < 0 else "truncated" if found != size else "checksum mismatch"
                raise UserError(f"memory file {full} is corrupt ({what}); restore the checkpoint folder or start "
                                f"a new run without resuming")
        out = cls(settings)
        for name in NAMES:
            out.memories[name].attach(os.path.join(folder, name), next_key[name])
            out.windows[name] = deque(windows[name], maxlen=settings.window)
        out.folder, out.disk_bytes = folder, sum(size for size, _ in files.values())
        return out

    # -- inspection --------------------------------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """Sizes for the step log: keys and values per memory, keys not yet folded, bytes of the last save."""
        out = {}
        for name in NAMES:
            out[f"{name}_keys"] = len(self.memories[name])
            out[f"{name}_values"] = self.memories[name].n_values()
        out["delta_keys"] = sum(len(m._delta_keys) for m in self.memories.values())
        out["explore_on"] = int(len(self.failure) >= self.settings.explore_warmup)
        out["disk_bytes"] = self.disk_bytes
        return out

    def nearest(self, question_vec: np.ndarray, n: int = 5) -> list[Neighbour]:
        """The `n` stored questions nearest to one question embedding [D], in each memory, nearest first."""
        out = []
        for name in NAMES:
            memory = self.memories[name]
            keys, dist = memory.search(np.asarray(question_vec, dtype=np.float32)[None], n)  # [1, n], [1, n]
            for key, d in zip(keys[0], dist[0]):
                if key >= 0:
                    out.append(Neighbour(name, int(key), memory.question(int(key)), float(d),
                                         len(memory.values(int(key)))))
        return out


def _crc32(path: str, chunk: int = 1 << 22) -> int:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return crc


def _file_info(path: str) -> dict[str, int]:
    return {"bytes": os.path.getsize(path), "crc32": _crc32(path)}


def _fsync_dir(folder: str, subfolders: list[str]) -> None:
    """fsync every file in `subfolders`, then the folders themselves, so a rename publishes complete data."""
    for sub in subfolders:
        for file in os.listdir(sub):
            with open(os.path.join(sub, file), "rb") as f:
                os.fsync(f.fileno())
    for path in [*subfolders, folder]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
