"""Where a GPU step's time goes, phase by phase: time, useful FLOP/s and memory traffic against the card's peak,
and kernel launches; generation eagerly and as replayed CUDA graphs (and, with --modes ...,compile, torch.compile's
"reduce-overhead" mode), training at several micro-batch sizes (and with every decoder layer compiled on its own,
regional compilation, or the log-prob chunk compiled: --compile-layers). Writes bench/results/profile_gpu.json.

    python bench/randmodel.py Qwen/Qwen2.5-0.5B-Instruct /tmp/tinyrl-budget/qwen
    python bench/profile_gpu.py --model /tmp/tinyrl-budget/qwen                 # P=8 G=16, 200 new tokens, bf16
    python bench/profile_gpu.py --model /tmp/tinyrl-budget/qwen --modes graph,compile --micro-batches 32 \
        --compile-layers --out bench/results/profile_gpu_compile.json              # torch.compile, both phases
    python bench/profile_gpu.py --device cpu --smoke --model FOLDER --out x.json  # the same code on a CPU

The results file is rewritten after every phase (a run stopped by a time limit keeps what it measured). The work
is fixed: every row generates exactly --new-tokens tokens (min_new_tokens = max_new_tokens), from
prompts of --prompt-tokens tokens (random ids, each prompt left-padded to a different length, as a batch of real
prompts is), sampled under one seed; every mode's tokens are compared with eager decoding's. Training runs
loop.train_step (reference pass, forward and backward, fused AdamW) on the generated batch.

FLOPs and bytes are counted from the model's geometry (tinyrl.budget.ModelGeometry), the useful work only:
  decode   per token and row 2·(N + V·D + LoRA) + 4·L·H·hd·T̄ FLOPs (T̄ the mean attended length); per step the
           weights once (16-bit: 2 B/param; 4-bit: the NF4 bytes plus the dequantised 16-bit copy written and read)
           plus the rows' K/V over T̄;
  prefill  2·N per prompt token of the distinct prompts;
  train    per token (8 with checkpointing, else 6)·N (reference, forward, recompute, backward through the inputs)
           + the LM head at completion tokens 8·V·D (reference, forward, backward's recompute and gradient);
           the weights read once per pass per micro-batch (why fewer, larger micro-batches move fewer bytes).
Launches are the CUDA runtime/driver launch calls the profiler sees (a graph replay is one): for generation counted
on calls of 16 and 32 tokens and extrapolated linearly to --new-tokens (not for --compile's mode); for training
in one call. The T4
column is an estimate from the measured work, not a measurement: max(FLOPs / 50 % of 65 TFLOP/s fp16, bytes / 80 %
of 320 GB/s) + launches x 8 µs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [HERE, ROOT]

import hardware  # noqa: E402 - after the path
from tinyrl.budget import nf4_bytes  # noqa: E402

# dense bf16/fp16 tensor FLOP/s and memory bandwidth (B/s), from the vendors' data sheets
PEAKS = {"H200": (989e12, 4.8e12), "H100 PCIe": (756e12, 2.0e12), "H100": (989e12, 3.35e12),
         "A100-SXM4-80GB": (312e12, 2.04e12), "A100": (312e12, 1.555e12), "L4": (121e12, 0.3e12),
         "A10G": (125e12, 0.6e12), "T4": (65e12, 0.32e12), "P100": (18.7e12, 0.732e12)}
T4 = {"flops": 65e12 * 0.5, "bandwidth": 320e9 * 0.8, "launch_s": 8e-6}
LAUNCH_TOKENS = 16  # launches are counted on calls of 16 and 32 tokens and extrapolated to --new-tokens
LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx", "cudaGraphLaunch")


def peaks(name: str) -> tuple[float, float] | None:
    return next((p for key, p in PEAKS.items() if key in name), None)


class Work:
    """Useful FLOPs and bytes of each phase for one geometry and run shape (the module docstring's model)."""

    def __init__(self, g, quant: str, c: int, rank: int, rows: int, tp: int, tc: int, k: int, ckpt: bool):
        self.g, self.rows, self.tp, self.tc, self.k, self.ckpt = g, rows, tp, tc, k, ckpt
        self.n = g.linear_params()
        self.head = g.vocab * g.hidden
        self.lora = g.lora_params(rank)
        nf4 = nf4_bytes(self.n) / self.n + 2 * c  # NF4 (with its scales), then the c-byte copy written and read
        self.weight_bytes = self.n * (nf4 if quant == "4bit" else c) + self.head * c
        self.c = c

    def decode(self) -> tuple[float, float]:
        g, t_mean = self.g, self.tp + self.tc / 2
        flops = self.rows * self.tc * (2 * (self.n + self.head + self.lora) + 4 * g.layers * g.q_dim * t_mean)
        kv = 2 * g.layers * g.kv_dim * t_mean * self.rows * self.c
        return flops, self.tc * (self.weight_bytes + kv)

    def prefill(self) -> tuple[float, float]:
        return 2 * self.n * self.k * self.tp, self.weight_bytes

    def train(self, micro_batch: int) -> tuple[float, float]:
        passes = 4 if self.ckpt else 3
        tokens = self.rows * (self.tp + self.tc)
        flops = 2 * passes * self.n * tokens + 8 * self.head * self.rows * self.tc
        micro = -(-self.rows // micro_batch)
        return flops, micro * passes * self.weight_bytes


def prompts_batch(tokenizer, n: int, length: int, seed: int):
    """n prompts of random ids, left-padded: prompt i has length - 3·i real tokens (at least 8)."""
    import torch

    from tinyrl.types import Example, PromptBatch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(6, len(tokenizer) - 1, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    for i in range(n):
        pad = min(3 * i, length - 8)
        ids[i, :pad], mask[i, :pad] = tokenizer.pad_token_id, 0
    return PromptBatch(tuple(Example(f"q{i}", "0", i) for i in range(n)), ("",) * n, ids, mask)


def timed(fn, device) -> tuple[float, object]:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
    began = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - began, out


def launches(fn, device) -> int | None:
    """Launch calls the profiler sees while fn runs once (None on a CPU, or where the profiler fails: the phase's
    time still counts)."""
    if device.type != "cuda":
        return None
    import torch
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
    except Exception as err:  # noqa: BLE001 - e.g. no CUPTI
        print(f"profiler failed, launches not counted: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        return None
    return sum(e.count for e in prof.key_averages() if e.key in LAUNCHES)


def row(name: str, seconds: float, flops: float, nbytes: float, launched: int | None, card) -> dict:
    out = {"phase": name, "s": round(seconds, 4), "tflops_per_s": round(flops / seconds / 1e12, 3),
           "gb_per_s": round(nbytes / seconds / 1e9, 2), "launches": launched,
           "flops": flops, "bytes": nbytes}
    if card:
        out["share_of_peak_flops"] = round(flops / seconds / card[0], 4)
        out["share_of_peak_bandwidth"] = round(nbytes / seconds / card[1], 4)
    t4 = max(flops / T4["flops"], nbytes / T4["bandwidth"]) + (launched or 0) * T4["launch_s"]
    out["t4_estimate_s"] = float(f"{t4:.4g}")
    return out


def generate_rows(model, tok, prompts, args, work, device, card, out: list, save) -> object:
    """Each decoding mode: a warm-up call, a timed one, two short profiled ones; tokens compared with the first
    mode's."""
    import torch

    from tinyrl import decoding, policy

    modes = [m if device.type == "cuda" or m != "graph" else "static" for m in args.modes]
    reference, batch = None, None
    for mode in modes:
        real_step = decoding.StaticStep.step
        try:
            if mode == "compile":  # torch.compile's CUDA graphs (cudagraph trees) around the shape-static step
                decoding.StaticStep.step = torch.compile(real_step, mode="reduce-overhead")

            def call(tokens=args.new_tokens):
                torch.manual_seed(args.seed)
                return policy.generate(model, tok, prompts, group_size=args.group, max_new_tokens=tokens,
                                       min_new_tokens=tokens, gen_batch=args.prompts * args.group,
                                       decode_mode="static" if mode == "compile" else mode)

            call() if mode == "compile" else call(LAUNCH_TOKENS)  # warm-up (compile: the shapes timed next)
            seconds, rollouts = timed(call, device)
            launched = None
            if mode != "compile":  # launches grow linearly with tokens: count two short calls, extrapolate
                short, longer = (launches(lambda n=n: call(n), device) for n in (LAUNCH_TOKENS, 2 * LAUNCH_TOKENS))
                if short is not None and longer is not None:
                    launched = round(short + (longer - short) / LAUNCH_TOKENS * (args.new_tokens - LAUNCH_TOKENS))
        except Exception as err:  # noqa: BLE001 - a mode that fails is a result, not the end of the bench
            out.append({"phase": f"generate ({mode})", "error": f"{type(err).__name__}: {str(err)[:300]}"})
            save()
            continue
        finally:
            decoding.StaticStep.step = real_step
        flops, nbytes = (a + b for a, b in zip(work.decode(), work.prefill()))
        r = row(f"generate ({mode})", seconds, flops, nbytes, launched, card)
        r["tokens_per_s"] = round(args.prompts * args.group * args.new_tokens / seconds, 1)
        if reference is None:
            reference, batch = (mode, rollouts.completion_ids), rollouts
        r[f"same_tokens_as_{reference[0]}"] = round((rollouts.completion_ids == reference[1]).float().mean().item(), 4)
        out.append(r)
        save()
        print(json.dumps(r), flush=True)
    return batch


def train_rows(parts, cfg, batch, args, work, device, card, out: list, save) -> None:
    """loop.train_step on the generated batch at each micro-batch size (and with compiled layers)."""
    import torch

    from tinyrl import grpo, loop, policy

    adv = torch.linspace(-1, 1, batch.completion_ids.shape[0])
    tb = grpo.train_batch(batch, adv)
    last = args.micro_batches[-1]
    variants = [(b, "") for b in args.micro_batches]
    if args.compile_layers:
        variants += [(last, "compiled layers"), (last, "compiled log-prob chunk")]
    layers = policy.causal_lm(parts.model).get_decoder().layers
    real_chunk = policy.scoring._logprob_and_lse  # patched where _TokenLogprob looks it up
    for b, compiled in variants:
        c = loop.with_overrides(cfg, micro_batch=b, logprob_chunk=min(4, b))
        name = f"train (micro_batch {b}{', ' + compiled if compiled else ''})"
        try:
            if compiled == "compiled layers":  # regional compilation: each decoder layer on its own
                for layer in layers:
                    layer.compile(dynamic=False)
            elif compiled:  # the log-prob chunk's forward (its backward recomputes through policy.scoring._logits)
                policy.scoring._logprob_and_lse = torch.compile(real_chunk, dynamic=False)

            def call():
                return loop.train_step(parts.model, parts.optimizer, tb, c, device)

            call()
            seconds, _ = timed(call, device)
            launched = launches(call, device)
        except Exception as err:  # noqa: BLE001
            out.append({"phase": name, "error": f"{type(err).__name__}: {str(err)[:300]}"})
            save()
            continue
        finally:
            for layer in layers:
                layer.__dict__.pop("_compiled_call_impl", None)
            policy.scoring._logprob_and_lse = real_chunk
        flops, nbytes = work.train(b)
        r = row(name, seconds, flops, nbytes, launched, card)
        out.append(r)
        save()
        print(json.dumps(r), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="model folder (bench/randmodel.py makes the public geometries)")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--quant", choices=("none", "4bit"), default="none")
    ap.add_argument("--prompts", type=int, default=8, help="P (default %(default)s)")
    ap.add_argument("--group", type=int, default=16, help="G (default %(default)s)")
    ap.add_argument("--prompt-tokens", type=int, default=150, help="padded prompt length (default %(default)s)")
    ap.add_argument("--new-tokens", type=int, default=200, help="tokens per completion (default %(default)s)")
    ap.add_argument("--micro-batches", default="8,32,128", help="training micro-batch sizes to time")
    ap.add_argument("--modes", default="eager,graph", help="decoding modes, the first the reference for tokens: "
                    "eager, graph (static on a CPU), compile (torch.compile reduce-overhead)")
    ap.add_argument("--compile-layers", action="store_true",
                    help="also train at the last micro-batch size with every decoder layer compiled, and with the "
                    "log-prob chunk's forward compiled")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="P=2 G=2, 8-token prompts, 8 new tokens, micro-batch 2,4")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "profile_gpu.json"))
    args = ap.parse_args()
    if args.smoke:
        args.prompts, args.group, args.prompt_tokens, args.new_tokens, args.micro_batches = 2, 2, 12, 8, "2,4"
    args.micro_batches = [int(x) for x in args.micro_batches.split(",") if x]
    args.modes = [m for m in args.modes.split(",") if m]

    import torch
    import transformers

    from tinyrl import budget, loop
    from tinyrl.config import Config

    cfg = Config(task="toy", model=args.model, out="/tmp/tinyrl-profile", device=args.device, dtype=args.dtype,
                 quant=args.quant, prompts_per_step=args.prompts, group_size=args.group, temperature=0.9,
                 max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, lora_rank=16, lora_alpha=32,
                 max_prompt_tokens=args.prompt_tokens)
    parts = loop.load_parts(cfg, None, quiet=True)
    device = parts.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    card = peaks(name) if device.type == "cuda" else None
    with open(os.path.join(args.model, "config.json")) as f:
        g = budget.geometry_from_config(json.load(f))
    c = budget.DTYPES[args.dtype]
    rows = args.prompts * args.group
    work = Work(g, args.quant, c, 16, rows, args.prompt_tokens, args.new_tokens, args.prompts, True)
    prompts = prompts_batch(parts.tokenizer, args.prompts, args.prompt_tokens, args.seed)
    phases: list[dict] = []
    result = {"date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "commit": hardware.commit(),
              "command": "python " + " ".join(sys.argv),
              "hardware": {"device": name, "peak_flops": card[0] if card else None,
                           "peak_bandwidth": card[1] if card else None, "torch": torch.__version__,
                           "transformers": transformers.__version__, "python": platform.python_version()},
              "settings": {"model": os.path.basename(args.model.rstrip("/")), "dtype": args.dtype, "quant": args.quant,
                           "P": args.prompts, "G": args.group, "prompt_tokens": args.prompt_tokens,
                           "new_tokens": args.new_tokens, "lora_rank": 16, "grad_checkpointing": True},
              "t4_estimate": "max(FLOPs / (50 % of 65 TFLOP/s), bytes / (80 % of 320 GB/s)) + launches x 8 us: an "
                             "estimate from the measured work, not a measurement",
              "phases": phases}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

    def save() -> None:  # after every phase, so a run stopped by its time limit keeps what it measured
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1)
        os.replace(tmp, args.out)

    batch = generate_rows(parts.model, parts.tokenizer, prompts, args, work, device, card, phases, save)
    if batch is not None:
        train_rows(parts, cfg, batch, args, work, device, card, phases, save)
    save()
    print(f"wrote {args.out}")
    return 0 if all("error" not in p for p in phases if "compile" not in p["phase"]) else 1


if __name__ == "__main__":
    sys.exit(main())
