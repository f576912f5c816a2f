"""Memory store bench: insert, fold, open, query and recall at 100k keys, and one step's memory work.

    python bench/memory.py                 # 100k keys (~3 min on 2 cores); writes bench/results/memory.{json,md}
    python bench/memory.py --keys 20000    # quicker
    python bench/memory.py --real          # also recall on real MiniLM embeddings of GSM8K (encodes once, cached
                                           # in .cache/gsm8k_minilm.npy: ~6 min on 2 CPU cores)

What it measures, on embedding-like data (384-d unit vectors around a shared direction, 1000 topics × 10
sub-topics, with noise; its nearest-neighbour cosines are printed next to real GSM8K MiniLM ones):
- add rate (keys/s) through `Memory.add` (the int8 HNSW insert dominates), and 100 values per key for a subset;
- the fold at a checkpoint (`MemoryState.save`), file sizes, open time of the saved state (index `view` + mmap'd
  sidecars, checksums skipped) and the CRC-32 check separately, RSS after opening;
- query latency p50/p99 of one question (index search on the mmap'd base + delta, exact re-rank), with 90 % of
  the keys in the base and 10 % in the delta, as between two checkpoints: wall time, and the thread's CPU time,
  which shared machines do not inflate;
- recall@1 and recall@10 against exact float search, for the raw int8 index and after the exact re-rank, at
  expansion_search 64/128/256;
- one training step's memory work at paper settings (P = 16 prompts × G = 16 completions, K = 1 and K = 20,
  memories half full, encodes excluded): batched search + rewards + insert, in ms.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import usearch
from usearch.index import Index

from hardware import cpu_name

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tinyrl.memory import MemorySettings, MemoryState  # noqa: E402

D = 384
RESULTS = Path(__file__).resolve().parent / "results"


def embedding_like(n: int, rng: np.random.Generator, topics: int = 1000, subtopics: int = 10) -> np.ndarray:
    """[n, D] float32 unit vectors: 0.35 shared direction + 0.20 topic + 0.15 sub-topic + 0.30 noise (variances).

    Chosen so random pairs have cosine ~0.35 and nearest neighbours ~0.7, as MiniLM embeddings of GSM8K do.
    """
    shared = rng.standard_normal(D)
    topic = rng.standard_normal((topics, D))
    sub = rng.standard_normal((topics * subtopics, D))
    which = rng.integers(topics * subtopics, size=n)  # [n] sub-topic of each point
    parts = [(0.35, np.broadcast_to(shared, (n, D))), (0.20, topic[which // subtopics]), (0.15, sub[which]),
             (0.30, rng.standard_normal((n, D)))]
    x = sum(np.sqrt(w) * p / np.linalg.norm(p, axis=-1, keepdims=True) for w, p in parts)  # [n, D]
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def exact_top(keys16: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact cosine top-k row indices [Q, k] (float32 matmul in chunks, fp16 keys as stored)."""
    kn = keys16.astype(np.float32)
    kn /= np.linalg.norm(kn, axis=1, keepdims=True)
    out = []
    for start in range(0, len(queries), 256):
        sims = queries[start:start + 256] @ kn.T  # [q, n]
        part = np.argpartition(-sims, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sims, part, 1), axis=1)
        out.append(np.take_along_axis(part, order, 1))
    return np.concatenate(out)


def recall(got: np.ndarray, exact: np.ndarray, k: int) -> float:
    return float(np.mean([len(set(g[:k]) & set(e[:k])) / k for g, e in zip(got, exact)]))


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def nn_stats(keys: np.ndarray, queries: np.ndarray) -> dict:
    sims = queries[:500] @ keys.T  # [500, n]
    top = -np.sort(-sims, axis=1)[:, :10]
    return {"top1_cos_median": round(float(np.median(top[:, 0])), 3),
            "top1_minus_top2_median": round(float(np.median(top[:, 0] - top[:, 1])), 4),
            "top10_cos_median": round(float(np.median(top[:, 9])), 3),
            "random_pair_cos_mean": round(float(sims.mean()), 3)}


def bench_store(n: int, rng: np.random.Generator, work: str) -> dict:
    data = embedding_like(n + 1000, rng)
    keys, queries = data[:n], data[n:]  # [n, D], [1000, D]
    texts = [f"q{i}" for i in range(n)]
    s = MemorySettings(max_keys=n)
    state = MemoryState(s)
    base_n = n * 9 // 10
    out = {"keys": n, "data": nn_stats(keys, queries)}
    print(f"data: {out['data']}")

    t = time.perf_counter()
    for start in range(0, base_n, 4096):  # keys arrive in batches, as steps would bring them
        end = min(start + 4096, base_n)
        state.success.add(texts[start:end], keys[start:end], keys[start:end])
    add_s = time.perf_counter() - t
    out["add_keys_per_s"] = round(base_n / add_s)
    print(f"add: {base_n} keys in {add_s:.1f} s = {out['add_keys_per_s']} keys/s")

    subset = min(1000, base_n)  # 100 values per key for a subset: 1000 keys × 99 more values
    vals = embedding_like(subset * 99, rng)
    t = time.perf_counter()
    rows = np.repeat(np.arange(subset), 99)
    state.success.add([texts[i] for i in rows], keys[rows], vals)
    out["add_values_per_s"] = round(len(rows) / (time.perf_counter() - t))
    print(f"values: {len(rows)} in {time.perf_counter() - t:.2f} s = {out['add_values_per_s']}/s")

    folder = os.path.join(work, "mem")
    t = time.perf_counter()
    state.save(folder)
    out["first_save_s"] = round(time.perf_counter() - t, 2)
    state.success.add(texts[base_n:], keys[base_n:], keys[base_n:])  # the last 10 % stay in the delta
    t = time.perf_counter()
    state.save(os.path.join(work, "mem2"))  # a checkpoint: base copied, delta folded in, written, swapped
    out["fold_save_s"] = round(time.perf_counter() - t, 2)
    out["files_bytes"] = {p.name: p.stat().st_size for p in sorted(Path(work, "mem2", "success").iterdir())}
    out["disk_bytes"] = state.disk_bytes
    print(f"save: first {out['first_save_s']} s, fold of {n - base_n} delta keys {out['fold_save_s']} s; "
          f"files {out['files_bytes']}")

    # open: time it, then rebuild base (90 %) + delta (10 %) as between two checkpoints
    del state
    index_path = os.path.join(work, "mem", "success", "index.usearch")
    t = time.perf_counter()
    Index.restore(index_path, view=True)
    out["open_index_view_ms"] = round(1e3 * (time.perf_counter() - t), 2)
    rss0 = rss_mb()
    t = time.perf_counter()
    state = MemoryState.open(folder, verify=False)
    out["open_state_ms"] = round(1e3 * (time.perf_counter() - t), 1)
    out["rss_after_open_mb"] = round(rss_mb() - rss0, 1)
    t = time.perf_counter()
    MemoryState.open(folder, verify=True)
    out["open_state_verified_ms"] = round(1e3 * (time.perf_counter() - t), 1)
    print(f"open: index view {out['open_index_view_ms']} ms, state (no CRC) {out['open_state_ms']} ms, with CRC "
          f"{out['open_state_verified_ms']} ms; RSS +{out['rss_after_open_mb']} MB")
    state.success.add(texts[base_n:], keys[base_n:], keys[base_n:])
    memory = state.success

    exact = exact_top(keys.astype(np.float16), queries, 10) + 1  # key ids start at 1, in insertion order
    # Latency: the widths are interleaved query by query, three rounds, so that the load of a shared machine
    # hits them alike; each round gives a p50/p99, and the median round is reported.
    widths = (32, 64, 128, 256)
    wall = {ef: [[] for _ in range(3)] for ef in widths}
    cpu = {ef: [[] for _ in range(3)] for ef in widths}
    for rnd in range(3):
        for q in queries:
            for ef in widths:
                memory._base.expansion_search = memory._delta.expansion_search = ef
                t, c = time.perf_counter(), time.thread_time()
                memory.search(q[None], 1)
                wall[ef][rnd].append(time.perf_counter() - t)
                cpu[ef][rnd].append(time.thread_time() - c)

    def ms(samples: list[list[float]], pct: float) -> float:
        return round(1e3 * float(np.median([np.percentile(r, pct) for r in samples])), 3)

    out["query"] = {}
    for ef in widths:
        memory._base.expansion_search = memory._delta.expansion_search = ef
        got, _ = memory.search(queries, 10)
        raw = np.stack([_raw_top(memory, q, 10) for q in queries])
        row = {"p50_ms": ms(wall[ef], 50), "p99_ms": ms(wall[ef], 99),
               "cpu_p50_ms": ms(cpu[ef], 50), "cpu_p99_ms": ms(cpu[ef], 99),
               "p50_ms_rounds": [round(1e3 * float(np.percentile(r, 50)), 3) for r in wall[ef]],
               "recall@1": round(recall(got, exact, 1), 4), "recall@10": round(recall(got, exact, 10), 4),
               "int8_index_only_recall@1": round(recall(raw, exact, 1), 4),
               "int8_index_only_recall@10": round(recall(raw, exact, 10), 4)}
        out["query"][f"expansion_search={ef}"] = row
        print(f"query ef={ef}: {row}")
    out["rss_after_queries_mb"] = round(rss_mb() - rss0, 1)
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return out


def _raw_top(memory, q: np.ndarray, k: int) -> np.ndarray:
    """The int8 index's own top-k over base + delta (no exact re-rank), by its distances."""
    found = []
    for ix in (memory._base, memory._delta):
        if ix is None or not len(ix):
            continue
        m = ix.search(q, k)
        found += list(zip(m.distances[:len(m)], m.keys[:len(m)]))
    return np.array([key for _, key in sorted(found)[:k]], dtype=np.int64)


def bench_real(rng: np.random.Generator) -> dict | None:
    """Recall on real MiniLM embeddings: GSM8K train questions as keys, test questions as queries."""
    cache = Path(__file__).resolve().parents[1] / ".cache" / "gsm8k_minilm.npy"
    data = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"
    if not cache.exists():
        if not data.exists():
            print("real: ../shared/data/gsm8k not found, skipped")
            return None
        from tinyrl.encoder import Encoder

        texts = [json.loads(line)["question"] for split in ("train", "test")
                 for line in open(data / f"{split}.jsonl", encoding="utf-8")]
        t = time.perf_counter()
        vecs = Encoder("minilm").encode(texts)
        print(f"real: encoded {len(texts)} questions in {time.perf_counter() - t:.0f} s")
        cache.parent.mkdir(exist_ok=True)
        np.save(cache, vecs)
    vecs = np.load(cache)
    keys, queries = vecs[:7473], vecs[7473:]
    state = MemoryState(MemorySettings(max_keys=len(keys)))
    state.success.add([f"q{i}" for i in range(len(keys))], keys, keys)
    exact = exact_top(keys.astype(np.float16), queries, 10) + 1
    out = {"keys": len(keys), "queries": len(queries), "data": nn_stats(keys, queries)}
    for ef in (32, 64, 128):
        state.success._delta.expansion_search = ef
        got, _ = state.success.search(queries, 10)
        raw = np.stack([_raw_top(state.success, q, 10) for q in queries])
        out[f"expansion_search={ef}"] = {
            "recall@1": round(recall(got, exact, 1), 4), "recall@10": round(recall(got, exact, 10), 4),
            "int8_index_only_recall@1": round(recall(raw, exact, 1), 4),
            "int8_index_only_recall@10": round(recall(raw, exact, 10), 4)}
    print(f"real GSM8K MiniLM: {out}")
    return out


def bench_step(rng: np.random.Generator, k: int, work: str, steps: int = 20) -> dict:
    """One step's memory work at paper settings: P = 16, G = 16, memories half full, K as given."""
    p, g = 16, 16
    s = MemorySettings(k=k, max_keys=10000, max_values=100, explore_warmup=500)
    state = MemoryState(s)
    n_keys, per_key = 3500, 16  # about mid-epoch on GSM8K: 3500 questions seen, 16 traces each
    keys = embedding_like(n_keys + p * steps, rng)
    for name in ("success", "failure"):
        rows = np.repeat(np.arange(n_keys), per_key)
        vals = embedding_like(len(rows), rng)
        state.memories[name].add([f"q{i}" for i in rows], keys[rows], vals)
    state.save(os.path.join(work, f"step-k{k}"))  # the frozen part is mmap'd, as after a checkpoint
    times, parts = [], []
    for step in range(steps):
        ids = np.arange(n_keys + step * p, n_keys + (step + 1) * p)  # fresh questions, as in one epoch
        rows = np.repeat(ids, g)  # [256]
        r = state.step([f"q{i}" for i in rows], keys[rows], embedding_like(p * g, rng), rng.random(p * g) < 0.3)
        times.append(r.timing_ms["total"])
        parts.append(r.timing_ms)
    med = {key: round(float(np.median([t[key] for t in parts[2:]])), 2) for key in parts[0]}
    out = {"k": k, "completions": p * g, "keys_per_memory": n_keys, "values_per_key": per_key,
           "median_ms": med, "p90_total_ms": round(float(np.percentile(times[2:], 90)), 2)}
    print(f"step K={k}: {out}")
    return out


def hardware() -> dict:
    probe = Index(ndim=D, metric="cos", dtype="i8")
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__,
            "usearch": usearch.__version__, "usearch_simd": probe.hardware_acceleration,
            "os": platform.platform(), "load_avg_1m": round(os.getloadavg()[0], 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--real", action="store_true", help="also measure recall on real GSM8K MiniLM embeddings")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--table", action="store_true", help="only rewrite memory.md from memory.json")
    args = parser.parse_args()
    if args.table:
        write_table(json.loads((RESULTS / "memory.json").read_text()))
        return
    rng = np.random.default_rng(args.seed)
    work = tempfile.mkdtemp(prefix="tinyrl-bench-memory-")
    try:
        result = {"hardware": hardware(), "settings": asdict(MemorySettings())}
        print(f"hardware: {result['hardware']}")
        result["store"] = bench_store(args.keys, rng, work)
        result["step"] = [bench_step(rng, k, work) for k in (1, 20)]
        if args.real:
            result["real_gsm8k"] = bench_real(rng)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "memory.json").write_text(json.dumps(result, indent=1) + "\n")
    write_table(result)


def write_table(result: dict) -> None:
    """bench/results/memory.md: one line of the headline numbers, at the default expansion_search."""
    st, hw = result["store"], result["hardware"]
    q = st["query"][f"expansion_search={result['settings']['expansion_search']}"]
    line = (f"| {st['keys']:,} | {st['add_keys_per_s']:,}/s | {q['p50_ms']} / {q['p99_ms']} ms "
            f"(CPU {q['cpu_p50_ms']} / {q['cpu_p99_ms']} ms) | {q['recall@1']} / {q['recall@10']} "
            f"(int8 alone {q['int8_index_only_recall@1']} / {q['int8_index_only_recall@10']}) | "
            f"{st['open_index_view_ms']} ms index, {st['open_state_ms']} ms state | {st['rss_after_open_mb']} MB | "
            f"{st['disk_bytes'] / 2**20:.0f} MiB | {result['step'][0]['median_ms']['total']} ms (K=1), "
            f"{result['step'][1]['median_ms']['total']} ms (K=20) | {hw['cpu']}, {hw['cores']} cores, load "
            f"{hw['load_avg_1m']}, usearch {hw['usearch']} |")
    header = ("| keys | insert | query p50 / p99 (K=1) | recall@1 / @10 vs exact | open (mmap) | RSS after open | "
              "disk | one step's memory work (256 completions) | hardware |\n"
              "|---|---|---|---|---|---|---|---|---|\n")
    (RESULTS / "memory.md").write_text(header + line + "\n")
    print(line)


if __name__ == "__main__":
    main()
