"""What shapes the memories and their rewards: MemorySettings (filled from a run's Config and checked), the two
write/read orders, and the index's search width.

Imports tinyrl.errors only: every other part of the memory package may import it.
"""

from __future__ import annotations

from dataclasses import dataclass

from tinyrl.errors import UserError

ORDERS = ("write-before-read", "read-before-write")


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


def search_width(settings: MemorySettings) -> int:
    """HNSW beam while searching: expansion_search, widened for large K so recall@K holds (K=20: 56).

    >>> search_width(MemorySettings(k=1)), search_width(MemorySettings(k=20))
    (32, 56)
    """
    return max(settings.expansion_search, 2 * settings.k + settings.rerank)
