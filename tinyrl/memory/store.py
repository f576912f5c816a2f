"""One memory: question keys in a usearch HNSW index (the saved part memory-mapped, new keys in an in-RAM delta,
evicted keys as tombstones), candidates re-ranked by exact cosine, and a FIFO list of value vectors per key.

Owns Memory (search, a step's write plan and its commit, the files of one memory and attaching them) and _Plan
(what one step writes). The storage layout is described in the package docstring. Imports numpy, usearch,
tinyrl.errors and memory.settings.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from usearch.index import Index

from tinyrl.errors import UserError
from tinyrl.memory.settings import MemorySettings, search_width

INDEX_FILE, KEYS_FILE, KEYVECS_FILE = "index.usearch", "keys.npy", "keyvecs.npy"
QUESTIONS_FILE, VALUES_FILE, OFFSETS_FILE = "questions.json", "values.npy", "offsets.npy"
MEMORY_FILES = (INDEX_FILE, KEYS_FILE, KEYVECS_FILE, QUESTIONS_FILE, VALUES_FILE, OFFSETS_FILE)


@dataclass
class _Plan:
    """What one step writes into one memory, in completion order. Times: row j writes at 2j."""

    key_of: dict[int, int] = field(default_factory=dict)  # row -> key it writes to
    new: dict[int, int] = field(default_factory=dict)  # new key -> time it is created
    new_text: dict[int, str] = field(default_factory=dict)  # new key -> question text
    new_row: dict[int, int] = field(default_factory=dict)  # new key -> row whose key vector it uses
    evicted: dict[int, int] = field(default_factory=dict)  # key -> time it is evicted (FIFO)
    appends: dict[int, list[int]] = field(default_factory=dict)  # key -> rows appending a value, in order


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
