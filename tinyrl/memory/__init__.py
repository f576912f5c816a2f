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

The parts, each importing only those above it (and numpy, usearch, tinyrl.errors):
  settings.py  MemorySettings, the two orders, the index's search width
  scores.py    the reward math: exploit_scores, explore_scores, window_normalise
  store.py     Memory: one memory's keys, values and files
  episode.py   MemoryState: both memories and windows, the per-step `step`, save / load / open
This file only re-exports them: `memory.MemoryState`, `memory.MemorySettings`, ... as before the split.
"""

from tinyrl.memory.episode import FORMAT, NAMES, NEVER, STATE_FILE, MemoryRewards, MemoryState, Neighbour
from tinyrl.memory.scores import exploit_scores, explore_scores, window_normalise
from tinyrl.memory.settings import ORDERS, MemorySettings, search_width
from tinyrl.memory.store import (
    INDEX_FILE,
    KEYS_FILE,
    KEYVECS_FILE,
    MEMORY_FILES,
    OFFSETS_FILE,
    QUESTIONS_FILE,
    VALUES_FILE,
    Memory,
)

__all__ = [
    "FORMAT", "INDEX_FILE", "KEYS_FILE", "KEYVECS_FILE", "MEMORY_FILES", "NAMES", "NEVER", "OFFSETS_FILE", "ORDERS",
    "QUESTIONS_FILE", "STATE_FILE", "VALUES_FILE", "Memory", "MemoryRewards", "MemorySettings", "MemoryState",
    "Neighbour", "exploit_scores", "explore_scores", "search_width", "window_normalise",
]
