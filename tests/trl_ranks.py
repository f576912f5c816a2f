"""Feeds fixed completions to tinyrl.trl's reward functions, one slice per rank, and writes what each rank saw.

    python -m torch.distributed.run --nproc_per_node 2 tests/trl_ranks.py OUT    # 2 processes (gloo)
    python tests/trl_ranks.py OUT                                                # 1 process, the same data

Writes OUT/rank<r>.json: every reward function's values for this rank's rows, per step, and a digest of the whole
memory state; rank 0 also saves the memory to OUT/mid after two steps and to OUT/memory at the end (other ranks
save to private temporary folders, never into OUT).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

GOOD = "<reasoning>\n{q} gives {a}\n</reasoning>\n<answer>\n{a}\n</answer>\n"
BAD = "<reasoning>\nguess for {q}\n</reasoning>\n<answer>\n{w}\n</answer>\n"


def batches(steps: int = 4, prompts: int = 4, group: int = 4) -> list[dict]:
    """Each step: P questions x G completions, a mix of right and wrong ones, with TRL's columns."""
    out = []
    for step in range(steps):
        rows = {"prompts": [], "completions": [], "answer": []}
        for p in range(prompts):
            number = 3 * step + p
            q = f"What is {number} plus {step}?"
            for g in range(group):
                right = (g + step + p) % 3 == 0
                text = (GOOD if right else BAD).format(q=q, a=number + step, w=number + step + g + 1)
                rows["prompts"].append([{"role": "user", "content": q}])
                rows["completions"].append([{"role": "assistant", "content": text}])
                rows["answer"].append(f"some working #### {number + step}")
        out.append(rows)
    return out


def digest(state) -> str:
    """Every key, question, value vector and window of both memories."""
    h = hashlib.sha256()
    for name, mem in state.memories.items():
        live = mem.live
        keys = list(live)
        h.update(json.dumps([name, keys, list(live.values())]).encode())
        if keys:
            import numpy as np

            h.update(mem.key_vectors(np.array(keys)).tobytes())
            for k in keys:
                h.update(mem.values(k).tobytes())
        h.update(json.dumps(list(state.windows[name])).encode())
    return h.hexdigest()


def main(out: str) -> None:
    import torch.distributed as dist

    from tinyrl.trl import MemoryRewardFunctions

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    funcs = MemoryRewardFunctions(method="memory-r+", out=out, encoder="hashing", explore_warmup=3,
                                  memory_window=8)
    seen = []
    for step, batch in enumerate(batches()):
        if step == 2:  # a checkpoint mid-run: rank 0 writes the run's copy, the others a private one
            funcs.save(os.path.join(out, "mid"))
        n = len(batch["completions"]) // world
        mine = {k: v[rank * n:(rank + 1) * n] for k, v in batch.items()}
        logged = {}
        values = {f.__name__: f(mine["prompts"], mine["completions"], answer=mine["answer"],
                                log_metric=lambda k, v: logged.__setitem__(k, v))
                  for f in funcs.reward_funcs()}
        seen.append({"values": values, "logged": sorted(logged)})
    saved = funcs.save()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"steps": seen, "digest": digest(funcs.memory), "saved": saved,
                   "stats": funcs.memory.stats()}, f)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
