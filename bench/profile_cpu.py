"""Where the time of a tinyrl step goes on this CPU, below the phase level: per-token decoding cost at batch 1
and 8, the LM head's share of it, what peft's LoRA forward costs in decoding, and the share of matmuls (`aten::mm`) in decoding and in training, from torch.profiler.

SmolLM2-135M with LoRA r16, fp32, 2 threads: 2 prompts of 85 random tokens x 4 completions, 64 new tokens (the
bench/vs_trl.py geometry), then one training micro-batch of those 8 rows (reference pass, forward, backward
with checkpointing). Writes bench/results/profile_cpu.json.

    OMP_NUM_THREADS=2 python bench/profile_cpu.py      # ~2 min on 2 cores
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch.profiler import profile  # noqa: E402

from hardware import cpu_name  # noqa: E402
from tinyrl import policy  # noqa: E402
from tinyrl.types import Example, PromptBatch  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "profile_cpu.json")
P, G, TP, TC = 2, 4, 85, 64


def mm_share(prof) -> float:
    """Share of the self CPU time spent in aten::mm."""
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    return sum(e.self_cpu_time_total for e in events if e.key == "aten::mm") / total


def timed(fn, clock=time.perf_counter) -> float:
    t = clock()
    fn()
    return clock() - t


def main() -> None:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    model, tok, _ = policy.load_policy("smollm2-135m", quant="none", dtype="fp32", device="cpu", lora_rank=16,
                                       lora_alpha=32, grad_checkpointing=True, seed=0)
    torch.manual_seed(0)
    ids = torch.randint(100, 1000, (P, TP))
    rendered = PromptBatch(tuple(Example("q", "1", i) for i in range(P)), ("",) * P, ids, torch.ones_like(ids))
    decoder = policy.causal_lm(model).get_decoder()

    def token_ms(batch: int) -> float:  # one decoding step's forward, no cache: the weights read once
        one = torch.randint(100, 1000, (batch, 1))
        with torch.no_grad():
            decoder(input_ids=one)
            times = []
            for _ in range(10):
                t = time.perf_counter()
                decoder(input_ids=one)
                times.append(time.perf_counter() - t)
        return 1000 * statistics.median(times)

    def sample():
        return policy.generate(model, tok, rendered, group_size=G, max_new_tokens=TC, gen_batch=P * G,
                               min_new_tokens=TC)

    sample()  # warm-up
    t = time.perf_counter()
    rollouts = sample()
    generate_s = time.perf_counter() - t
    with profile() as prof:
        sample()
    decode_mm = mm_share(prof)

    def step_cpu_ms(context) -> float:  # one decoding step of 8 rows: process CPU ms (both threads), median of 20
        one = torch.randint(100, 1000, (P * G, 1))
        with torch.no_grad(), context():
            decoder(input_ids=one)
            return 1000 * statistics.median(timed(lambda: decoder(input_ids=one), time.process_time)
                                            for _ in range(20))

    lora_ms = {"peft": [], "lean": [], "off": []}  # LoRA through peft's forward, tinyrl's lean closures, none
    for _ in range(5):  # alternated, so drift in machine speed hits all three
        lora_ms["peft"].append(step_cpu_ms(contextlib.nullcontext))
        lora_ms["lean"].append(step_cpu_ms(lambda: policy.lean_lora(model)))
        lora_ms["off"].append(step_cpu_ms(model.disable_adapter))
    hidden = torch.randn(P * G, decoder.config.hidden_size)
    head = policy.causal_lm(model).get_output_embeddings()
    with torch.no_grad():
        head_ms = statistics.median(timed(lambda: head(hidden)) for _ in range(10)) * 1000

    full = torch.cat([ids.repeat_interleave(G, 0), rollouts.completion_ids], 1)  # [8, TP+TC]
    mask = torch.ones_like(full)
    model.train()

    def train():
        ref = policy.reference_logprobs(model, full, mask, TC, 4)
        logp = policy.completion_logprobs(model, full, mask, TC, 4)
        (logp - ref).pow(2).sum().backward()
        model.zero_grad(set_to_none=True)

    train()  # warm-up
    t = time.perf_counter()
    train()
    train_s = time.perf_counter() - t
    with profile() as prof:
        train()
    train_mm = mm_share(prof)
    tokens = P * (TP - 1) + P * G * (TC + 1)  # what the decoder runs with shared prompts
    gflop = 2 * 4 * sum(p.numel() for n, p in decoder.named_parameters() if "embed" not in n) * tokens / 1e9

    result = {"hardware": {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__},
              "date": time.strftime("%Y-%m-%d"), "command": "OMP_NUM_THREADS=2 python bench/profile_cpu.py",
              "config": f"SmolLM2-135M fp32, LoRA r16, P={P} G={G}, {TP}-token prompts, {TC} new tokens",
              "decode_token_ms_batch1": round(token_ms(1), 1), "decode_token_ms_batch8": round(token_ms(P * G), 1),
              "generate_s": round(generate_s, 2), "generate_mm_share": round(decode_mm, 3),
              "decode_step_cpu_ms_batch8": {k: round(statistics.median(v), 1) for k, v in lora_ms.items()},
              "decode_step_cpu_ms_note": "process CPU ms (both threads) of one 8-row decoding step, median of 5 "
                                         "alternated rounds: LoRA through peft's forward, through tinyrl's lean "
                                         "closures (policy.lean_lora, what generate uses), and adapter off",
              "lm_head_ms_batch8": round(head_ms, 1),
              "train_s": round(train_s, 2), "train_mm_share": round(train_mm, 3),
              "train_decoder_gflop": round(gflop, 1),
              "train_note": "reference forward + forward + checkpoint recompute + input-grad backward = 4 decoder "
                            "forwards of the shared-prompt tokens (LoRA and the LM head not counted)"}
    for key, value in result.items():
        print(f"{key}: {value}")
    with open(OUT + ".tmp", "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    os.replace(OUT + ".tmp", OUT)
    print(f"wrote {os.path.relpath(OUT)}")


if __name__ == "__main__":
    main()
