"""The episodic step: both memories and both reward windows, all the memory state of a run.

Owns MemoryState (`step`: recall, rewards and writes for a whole batch of completions in one call; `save`, `load`
and `open`: the state folder, atomic and checksummed; `stats`, `nearest`), MemoryRewards and Neighbour. Imports
numpy, tinyrl.errors and memory.scores, memory.settings, memory.store.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
import zlib
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from tinyrl.errors import UserError
from tinyrl.memory.scores import exploit_scores, explore_scores, window_normalise
from tinyrl.memory.settings import MemorySettings
from tinyrl.memory.store import MEMORY_FILES, Memory, _Plan

FORMAT = "tinyrl-memory/1"
STATE_FILE = "state.json"
NAMES = ("success", "failure")
NEVER = 2 ** 62  # an event time after every step's events


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
