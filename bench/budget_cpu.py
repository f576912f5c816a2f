"""Check the planner's activation terms against a measured CPU run (no GPU needed).

Builds a small random Llama (hidden 256, 4 layers, vocab 49152, or 4096 where a decoder layer must set the peak)
with peft LoRA on every projection and runs tinyrl's own code: `policy.reference_logprobs` (the no-grad reference
pass, adapter disabled), then `policy.completion_logprobs` for one micro-batch forward + backward (non-reentrant
gradient checkpointing, completion-only log-probs computed `logprob_chunk` rows at a time, each chunk recomputed in
backward), one AdamW step, and `policy.generate` of 2 prompts x 4 completions (one shared prefill per prompt). Each
phase's peak resident memory above the memory before it (VmHWM after resetting it through /proc/self/clear_refs,
with glibc told to mmap every allocation >= 64 KiB so freed tensors leave the resident set) is compared with
`tinyrl.budget.estimate` for the same shapes, in fp32 and in bf16 (base in bf16, LoRA in fp32, as on a GPU). What
this checks: the activation, log-prob, KV-cache, prefill and sampling terms (the last on 64 x 151936 logits, as
`policy.decode` samples them), and a decoding step's attention (a grouped-query model with a long left-padded
cache, where one layer's K/V repeated to every head is the peak). What it cannot: the CUDA context, workspaces,
fragmentation, bitsandbytes (those need bench/budget.py on a GPU).

    OMP_NUM_THREADS=2 python bench/budget_cpu.py   # ~10 min on 2 cores (bf16 is slow on CPU); writes
                                                   # bench/results/budget_cpu.json
    OMP_NUM_THREADS=2 python bench/budget_cpu.py --decode-only   # a minute: the sampling and attention rows only
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from hardware import cpu_name

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "budget_cpu.json"

# Shapes of the check (small enough for 2 cores, large enough that each phase moves ~100 MB).
MODEL = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
             intermediate_size=1024, vocab_size=49152, tie_word_embeddings=True, model_type="llama")
RANK, TP, TC, MICRO, GEN_BATCH, GEN_TOKENS, GROUP = 16, 192, 128, 8, 8, 64, 4
SMALL_VOCAB = 4096  # a vocabulary this small keeps the log-prob buffers below one decoder layer's working set
CASES = [  # (dtype, grad_checkpointing, logprob_chunk, also generate, vocabulary): chunk 4 makes the log-prob
    # buffer the training peak; the small vocabulary leaves one decoder layer (recomputed, or its backward) as
    # the peak of training and of the reference pass, so both kinds of term are checked; chunk 1 at the full
    # vocabulary is a near-tie of the two
    ("fp32", True, 1, True, MODEL["vocab_size"]), ("fp32", True, 4, False, MODEL["vocab_size"]),
    ("fp32", True, 1, False, SMALL_VOCAB), ("fp32", False, 1, False, SMALL_VOCAB),
    ("bf16", True, 1, True, MODEL["vocab_size"]), ("bf16", True, 4, False, MODEL["vocab_size"]),
    ("bf16", True, 1, False, SMALL_VOCAB), ("bf16", False, 1, False, SMALL_VOCAB),
]


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def measure_once(fn) -> tuple[int, object]:
    """Peak resident bytes above the current resident size while fn() runs, and its result."""
    import gc

    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current VmRSS
    before = status_kib("VmRSS")
    out = fn()
    return (status_kib("VmHWM") - before) * 1024, out


def measure(fn) -> tuple[int, object]:
    """Steady state: the second of two identical runs (the first also fills one-time caches, e.g. oneDNN's)."""
    measure_once(fn)
    return measure_once(fn)


def one_case(dtype_name: str, ckpt: bool, chunk: int, generate: bool, vocab: int) -> dict:
    """Run one configuration in this process; return measured and estimated bytes per phase."""
    MODEL["vocab_size"] = vocab  # this process runs this one case
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from tinyrl import budget, policy

    torch.manual_seed(0)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    cfg = LlamaConfig(**{k: v for k, v in MODEL.items() if k != "model_type"}, attn_implementation="sdpa",
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg).to(dtype)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=2 * RANK, lora_dropout=0.0, target_modules=targets))
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = [p for p in model.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 for p in lora)
    opt = torch.optim.AdamW(lora, lr=5e-6, betas=(0.9, 0.99), weight_decay=0.1)

    # a left-padded micro-batch of b/group prompts (lengths 150..192), each repeated for `group` rows as in a
    # GRPO batch, so the rows of a group share their prompt's pass; completions of TC tokens
    gen = torch.Generator().manual_seed(0)

    def batch(b: int, tp: int, tc: int, group: int = 1):
        prompts = torch.randint(3, MODEL["vocab_size"], (b // group, tp), generator=gen)
        pmask = torch.ones_like(prompts)
        for row in range(len(prompts)):
            pad = int(torch.randint(0, tp - 150 + 1, (1,), generator=gen)) if tp > 150 else 0
            prompts[row, :pad], pmask[row, :pad] = 0, 0
        completions = torch.randint(3, MODEL["vocab_size"], (b, tc), generator=gen)
        ids = torch.cat([prompts.repeat_interleave(group, 0), completions], 1)  # [b, tp + tc]
        return ids, torch.cat([pmask.repeat_interleave(group, 0), torch.ones_like(completions)], 1)

    def completion_logprobs(ids, mask, tc: int, chunk: int):  # [B, Tc]: tinyrl's own code path
        return policy.completion_logprobs(model, ids, mask, tc, chunk)

    def reference(ids, mask, tc: int, chunk: int):
        return policy.reference_logprobs(model, ids, mask, tc, chunk)

    def forward_backward(ids, mask, ref, tc: int, chunk: int):
        logp = completion_logprobs(ids, mask, tc, chunk)  # [B, Tc]
        adv = torch.linspace(-1, 1, ids.shape[0])[:, None]  # [B, 1]
        kl = torch.exp(ref - logp) - (ref - logp) - 1  # [B, Tc]
        loss = -(adv * torch.exp(logp - logp.detach()) - 0.04 * kl).mean()
        loss.backward()

    def step():
        torch.nn.utils.clip_grad_norm_(lora, 0.1)
        opt.step()
        opt.zero_grad(set_to_none=True)

    # warm-up on a small batch: thread pools, kernels, the optimizer's moments (a "fixed" term in the planner)
    model.train()
    wid, wmask = batch(2, 160, 16, 2)
    forward_backward(wid, wmask, reference(wid, wmask, 16, 1), 16, 1)
    step()
    model.eval()
    with torch.no_grad():
        model.generate(input_ids=wid[:, :160], attention_mask=wmask[:, :160], max_new_tokens=4, do_sample=True)

    ids, mask = batch(MICRO, TP, TC, GROUP)
    model.train()
    ref_peak, ref = measure(lambda: reference(ids, mask, TC, chunk))

    def forward_backward_then_free():
        forward_backward(ids, mask, ref, TC, chunk)
        opt.zero_grad(set_to_none=True)

    fb_peak, _ = measure(forward_backward_then_free)
    forward_backward(ids, mask, ref, TC, chunk)
    step_peak, _ = measure_once(step)

    if generate:  # tinyrl's policy.generate: GEN_BATCH rows = GEN_BATCH/GROUP prompts x GROUP completions
        from randmodel import char_tokenizer

        from tinyrl.types import Example, PromptBatch

        prompts, pmask = batch(GEN_BATCH // GROUP, TP, 0)
        rendered = PromptBatch(examples=tuple(Example("q", "1", i) for i in range(len(prompts))),
                               texts=("",) * len(prompts), input_ids=prompts, attention_mask=pmask)
        tokenizer = char_tokenizer(MODEL["vocab_size"])
        model.eval()
        t0 = time.perf_counter()
        gen_peak, out = measure(lambda: policy.generate(
            model, tokenizer, rendered, group_size=GROUP, max_new_tokens=GEN_TOKENS, gen_batch=GEN_BATCH,
            min_new_tokens=GEN_TOKENS))
        assert out.completion_ids.shape == (GEN_BATCH, GEN_TOKENS)
        gen_s = (time.perf_counter() - t0) / 2

    geometry = budget.geometry_from_config(MODEL, "random-llama")
    caps = budget.DEVICES["cpu"]

    def estimate(tc: int, gen_batch: int):
        s = budget.Settings(group_size=GROUP, prompts_per_step=GEN_BATCH // GROUP, gen_batch=gen_batch, micro_batch=MICRO,
                            logprob_chunk=chunk, lora_rank=RANK, quant="none", dtype=dtype_name,
                            grad_checkpointing=ckpt, max_prompt_tokens=TP, max_new_tokens=tc)
        return budget.estimate(geometry, s, TP, caps, encoder_bytes=0)

    bd = estimate(TC, GEN_BATCH)
    term = {x.name: x.bytes for x in bd.terms}
    kept = term["checkpoint boundaries"] if ckpt else term["activations of all layers"]
    layer = term["one layer recomputed + its backward"] if ckpt else term["one layer's backward"]
    fb_est = (term["LoRA grads (fp32)"] + kept + term.get("shared prompts' K/V", 0) + term["final norm + hidden"]
              + term["loss working set"]
              + max(term["log-prob chunk (with grads)"], layer))
    def row(phase, measured, estimated):
        return {"phase": phase, "measured_bytes": measured, "estimated_bytes": estimated,
                "error": round((estimated - measured) / measured, 3) if measured > 2**20 else None}

    phases = [
        row("reference pass (no grad)", ref_peak, term["reference pass (no grad)"]),
        row("forward + backward (grads + activations + log-probs)", fb_peak, fb_est),
        row("optimizer step (too small to resolve)", step_peak, term["AdamW step temporaries"]),
    ]
    if generate:
        phases.append(row(f"generation ({GEN_BATCH} x ({TP}+{GEN_TOKENS}) tokens)", gen_peak,
                          estimate(GEN_TOKENS, GEN_BATCH).generation))
    return {"dtype": dtype_name, "grad_checkpointing": ckpt, "logprob_chunk": chunk, "vocab": vocab,
            "generate_seconds": round(gen_s, 2) if generate else None, "phases": phases}


SAMPLING_ROWS, SAMPLING_VOCAB = 64, 151936  # Bg x V of one decoding step's logits (Qwen2.5's vocabulary)


def sampling_case() -> list[dict]:
    """Bytes per logit of one decoding step's sampling, as policy.decode does it: the LM head's output in the
    model dtype, its fp32 copy, then policy.next_tokens (the planner's `sampling logits` term)."""
    import torch

    from tinyrl import budget, policy

    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        head = torch.randn(SAMPLING_VOCAB, 64, dtype=dtype)
        hidden = torch.randn(SAMPLING_ROWS, 64, dtype=dtype)
        for top_p in (1.0, 0.9):
            def step():
                logits = (hidden @ head.T).float()  # [Bg, V]
                return policy.next_tokens(logits, 0.9, top_p, greedy=False)

            peak, _ = measure(step)
            per_logit = peak / (SAMPLING_ROWS * SAMPLING_VOCAB)
            planned = budget.sampling_bytes(top_p)
            rows.append({"dtype": str(dtype).removeprefix("torch."), "top_p": top_p,
                         "measured_bytes_per_logit": round(per_logit, 2), "planned_bytes_per_logit": planned,
                         "error": round((planned - per_logit) / per_logit, 3)})
    return rows


# A decoding step whose peak is attention: 16 query heads on 2 key/value heads, a 2-layer model with a small
# vocabulary, and 2 prompts (480 and 512 tokens, so left padding and a mask) x 16 completions of 8 tokens.
ATTN_MODEL = dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=16, num_key_value_heads=2, head_dim=64,
                  intermediate_size=512, vocab_size=512, tie_word_embeddings=True, model_type="llama")
ATTN_PROMPTS, ATTN_TP, ATTN_GROUP, ATTN_TOKENS = 2, 512, 16, 8


def attention_case() -> dict:
    """policy.generate on ATTN_MODEL: the generation phase's peak vs the plan, where the plan's largest decoding
    term is `decode attention` (and what the plan would be without that term)."""
    import torch
    import transformers
    from randmodel import char_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    from tinyrl import budget, policy
    from tinyrl.types import Example, PromptBatch

    torch.manual_seed(0)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    cfg = LlamaConfig(**{k: v for k, v in ATTN_MODEL.items() if k != "model_type"}, attn_implementation="sdpa",
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(3, ATTN_MODEL["vocab_size"], (ATTN_PROMPTS, ATTN_TP))
    mask = torch.ones_like(ids)
    ids[0, :32], mask[0, :32] = 0, 0  # the first prompt is 480 tokens
    prompts = PromptBatch(examples=tuple(Example("q", "1", i) for i in range(ATTN_PROMPTS)),
                          texts=("",) * ATTN_PROMPTS, input_ids=ids, attention_mask=mask)
    rows = ATTN_PROMPTS * ATTN_GROUP
    tokenizer = char_tokenizer(ATTN_MODEL["vocab_size"])
    peak, out = measure(lambda: policy.generate(model, tokenizer, prompts, group_size=ATTN_GROUP,
                                                max_new_tokens=ATTN_TOKENS, gen_batch=rows,
                                                min_new_tokens=ATTN_TOKENS))
    assert out.completion_ids.shape == (rows, ATTN_TOKENS)
    g = budget.geometry_from_config(ATTN_MODEL, "gqa-16-on-2")
    s = budget.Settings(group_size=ATTN_GROUP, prompts_per_step=ATTN_PROMPTS, gen_batch=rows, micro_batch=1,
                        logprob_chunk=1, lora_rank=8, quant="none", dtype="fp32", grad_checkpointing=True,
                        max_prompt_tokens=ATTN_TP, max_new_tokens=ATTN_TOKENS)
    bd = budget.estimate(g, s, ATTN_TP, budget.DEVICES["cpu"], encoder_bytes=0)
    without = budget.estimate(g, s, ATTN_TP, budget.DEVICES["cpu"], encoder_bytes=0, repeats_kv=False).generation
    return {"transformers": transformers.__version__, "repeats_kv": budget.decode_repeats_kv(),
            "laid_out": budget.cache_lays_out(), "rows": rows, "cache_tokens": ATTN_TP + ATTN_TOKENS,
            "measured_bytes": peak, "planned_bytes": bd.generation, "error": round((bd.generation - peak) / peak, 3),
            "planned_without_attention_term": without, "error_without": round((without - peak) / peak, 3),
            "generation_rule": bd.generation_rule,
            "terms": {t.name: t.bytes for t in bd.terms if t.phase == "generation"}}


def hardware() -> dict:
    import torch

    mem = next(int(ln.split()[1]) * 1024 for ln in Path("/proc/meminfo").read_text().splitlines()
               if ln.startswith("MemTotal"))
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads(), "ram_bytes": mem,
            "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()}


def main() -> None:
    if len(sys.argv) == 7 and sys.argv[1] == "--one":
        print(json.dumps(one_case(sys.argv[2], sys.argv[3] == "ckpt", int(sys.argv[4]), sys.argv[5] == "gen",
                                  int(sys.argv[6]))))
        return
    if sys.argv[1:] == ["--one-decode"]:
        print(json.dumps({"sampling": sampling_case(), "attention": attention_case()}))
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, __file__, "--one-decode"], env=env, capture_output=True, text=True,
                          check=False)
    if done.returncode:
        sys.exit(f"decoding check failed:\n{done.stderr[-3000:]}")
    decode = json.loads(done.stdout.strip().splitlines()[-1])
    sampling, attention = decode["sampling"], decode["attention"]
    print(f"sampling, {SAMPLING_ROWS} x {SAMPLING_VOCAB} logits (bytes per logit):")
    for r in sampling:
        print(f"  {r['dtype']:<9} top_p {r['top_p']}: measured {r['measured_bytes_per_logit']:5.2f}   "
              f"planned {r['planned_bytes_per_logit']}   error {r['error']:+.0%}")
    a = attention
    print(f"decoding attention, {a['rows']} rows x {a['cache_tokens']} cached tokens, 16 heads on 2 K/V heads, "
          f"transformers {a['transformers']} ({'repeats K/V' if a['repeats_kv'] else 'packs the query heads'}): "
          f"measured {a['measured_bytes'] / 2**20:.1f} MiB   planned {a['planned_bytes'] / 2**20:.1f} MiB   "
          f"error {a['error']:+.0%}   (without the attention term: {a['error_without']:+.0%})")
    old = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    # one row per transformers version (run the script from an environment with another one to add its row)
    attention = [r for r in old.get("attention", []) if r["transformers"] != a["transformers"]] + [a]
    if sys.argv[1:] == ["--decode-only"]:  # refresh that part of the results file only
        result = old
        result.update(sampling=sampling, attention=attention, decode_date=time.strftime("%Y-%m-%d"))
        result.pop("sampling_date", None)
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote the decoding rows of {RESULTS.relative_to(ROOT)}")
        return
    cases = []
    for dtype_name, ckpt, chunk, generate, vocab in CASES:
        cmd = [sys.executable, __file__, "--one", dtype_name, "ckpt" if ckpt else "nockpt", str(chunk),
               "gen" if generate else "nogen", str(vocab)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if done.returncode:
            sys.exit(f"{dtype_name} ckpt={ckpt} failed:\n{done.stderr[-3000:]}")
        cases.append(json.loads(done.stdout.strip().splitlines()[-1]))
    for case in cases:
        print(f"{case['dtype']} checkpointing={'on' if case['grad_checkpointing'] else 'off'} "
              f"logprob_chunk={case['logprob_chunk']} vocab={case['vocab']}")
        for r in case["phases"]:
            error = "" if r["error"] is None else f"error {r['error']:+.0%}"
            print(f"  {r['phase']:<54} measured {r['measured_bytes'] / 2**20:7.1f} MiB   "
                  f"planned {r['estimated_bytes'] / 2**20:7.1f} MiB   {error}")
    result = {
        "what": "peak resident bytes per phase above the memory before it, vs tinyrl.budget.estimate",
        "method": "VmHWM reset via /proc/self/clear_refs, MALLOC_MMAP_THRESHOLD_=65536; one subprocess per case; "
                  "each phase run twice, the second measured",
        "notes": "training phases in bf16 check the 16-bit formulas (LoRA fp32 casts); generation runs "
                 "policy.generate (shared prefill)",
        "model": MODEL, "lora_rank": RANK, "prompt_tokens": TP, "completion_tokens": TC, "micro_batch": MICRO,
        "gen_batch": GEN_BATCH, "gen_tokens": GEN_TOKENS,
        "hardware": hardware(), "date": time.strftime("%Y-%m-%d"), "cases": cases, "sampling": sampling,
        "attention": attention, "attention_model": ATTN_MODEL, "decode_date": time.strftime("%Y-%m-%d"),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
