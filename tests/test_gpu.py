"""Checks that need a CUDA device (skipped without one): a real out-of-memory back-off, the fp16 encoder,
decoding into the laid-out cache, the log-prob chunk's hand-written backward, decoding as replayed CUDA graphs, and
a training step's host syncs."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

MiB = 2**20


def test_real_cuda_oom_backs_off_and_finishes_the_step(tmp_path):
    """Under a 256 MiB allocator cap, 512 sequences in flight and micro-batches of 512 run out of memory for
    real; fit halves gen_batch and micro_batch, redoes the same work, and finishes every step."""
    from tiny import make_tiny_model

    from tinyrl import loop
    from tinyrl.config import Config

    model = make_tiny_model(str(tmp_path / "model"), hidden=512, layers=4)
    cfg = Config(task="toy", model=model, out=str(tmp_path / "run"), steps=2, prompts_per_step=32, group_size=16,
                 gen_batch=512, micro_batch=512, logprob_chunk=4, max_new_tokens=64, min_new_tokens=64,
                 device="cuda", quant="none", save_every=1)
    torch.cuda.empty_cache()
    total, start = torch.cuda.get_device_properties(0).total_memory, torch.cuda.memory_reserved()
    torch.cuda.set_per_process_memory_fraction((start + 256 * MiB) / total)
    try:
        loop.fit(cfg, quiet=True)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    rows = [json.loads(line) for line in open(os.path.join(cfg.out, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["oom/backoffs"] >= 2  # at least one halving in each phase
    assert rows[0]["oom/gen_batch"] < 512 and rows[0]["oom/micro_batch"] < 512
    assert all(r["len/mean"] >= 64 for r in rows)  # every completion was generated in full
    assert max(r["mem/reserved"] for r in rows) <= 256 * MiB + start
    assert os.path.exists(os.path.join(cfg.out, "checkpoints"))


def test_encoder_fp16_on_gpu_matches_fp32_on_cpu(tmp_path):
    """The GPU path (fp16 weights, fp32 pooling) gives the same unit vectors as fp32 on CPU."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from tinyrl.encoder import Encoder

    folder = tmp_path / "bert"
    folder.mkdir()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list("abcdefghijklmnopqrstuvwxyz0123456789+=.<>/")
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=128)).save_pretrained(folder)
    gpu, cpu = Encoder(str(folder), device="cuda"), Encoder(str(folder), device="cpu")
    assert gpu.dtype == torch.float16 and cpu.dtype == torch.float32
    texts = ["tom has 3 apples and buys 4 more.", "<reasoning>3 + 4 = 7</reasoning>", "x" * 3000]
    a, b = gpu.encode(texts), cpu.encode(texts)
    assert a.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, rtol=1e-5)
    assert np.all(np.sum(a * b, axis=1) > 0.999)


def laid_out_vs_grown(folder: str) -> dict:
    """Greedy decoding of 64 rows for 256 tokens into the laid-out cache and into one grown by torch.cat: the share
    of equal tokens, and the allocator's peak reserve for each. Run by the test below in a fresh process."""
    from tinyrl import policy
    from tinyrl.types import Example, PromptBatch

    model, tok, _ = policy.load_policy(folder, quant="none", dtype="fp32", device="cuda", lora_rank=4, lora_alpha=8,
                                       grad_checkpointing=False, seed=0)
    texts = ["<|user|>" + "what is 12 + 30? " * (4 + i) + "<eos><|assistant|>" for i in range(4)]
    enc = tok(texts, return_tensors="pt", padding=True, padding_side="left")
    prompts = PromptBatch(tuple(Example(f"q{i}", "1", i) for i in range(4)), ("",) * 4, enc["input_ids"],
                          enc["attention_mask"])

    def run():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        out = policy.generate(model, tok, prompts, group_size=16, max_new_tokens=256, gen_batch=64,
                              min_new_tokens=256, greedy=True, decode_mode="eager").completion_ids  # the cache's
        # memory, the same decoding loop either way (decode=auto would capture a graph of the laid-out one only)
        return out, torch.cuda.max_memory_reserved()

    laid_out, reserved_laid_out = run()
    policy.generation.lay_out = lambda cache, rows, room: False  # this process only
    grown, reserved_grown = run()
    return {"equal": (laid_out == grown).float().mean().item(), "reserved_laid_out": reserved_laid_out,
            "reserved_grown": reserved_grown}


def test_laid_out_cache_on_cuda_samples_like_the_grown_one_and_reserves_less(tmp_path):
    """On CUDA, decoding into the cache laid out once (policy.lay_out) gives the greedy tokens of growing it by
    torch.cat (exactly equal on CPU, tests/test_policy.py; here attention may read the strided cache through
    another kernel, so a near-tie may flip), and with expandable segments the allocator reserves no more for it.
    With the default allocator it reserved more here (400 against 321 MB on an H100, 2026-11-26; docs/memory.md)."""
    import subprocess
    import sys

    from tiny import make_tiny_model

    folder = make_tiny_model(str(tmp_path / "model"), hidden=256, layers=4)
    here = os.path.dirname(__file__)
    env = dict(os.environ, PYTORCH_CUDA_ALLOC_CONF="expandable_segments:True",
               PYTHONPATH=os.pathsep.join([here, os.path.dirname(here), os.environ.get("PYTHONPATH", "")]))
    code = f"import json, test_gpu; print(json.dumps(test_gpu.laid_out_vs_grown({folder!r})))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["equal"] > 0.95
    assert got["reserved_laid_out"] <= got["reserved_grown"], got


def test_token_logprob_on_cuda_matches_autograd_and_holds_one_block():
    """The log-prob chunk's hand-written backward in bf16 on CUDA: the same values and gradients as autograd through
    log_softmax, and a backward that holds at most one fp32 block and its bf16 copy (6 B per logit; autograd 16)."""
    from tinyrl import budget, policy

    torch.manual_seed(0)
    c, tc, d, v = 4, 200, 896, 151936  # a chunk of 4 rows of Qwen2.5-0.5B's shapes
    head = torch.nn.Linear(d, v, bias=False, device="cuda", dtype=torch.bfloat16)
    head.weight.requires_grad_(False)  # frozen, as under LoRA
    h = torch.randn(c, tc, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    t = torch.randint(0, v, (c, tc), device="cuda")
    want = torch.log_softmax(head(h).float(), -1).gather(-1, t.unsqueeze(-1)).squeeze(-1)
    want.sum().backward()
    want_grad, h.grad = h.grad.clone(), None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    got = policy._TokenLogprob.apply(h, head.weight, None, t)
    got.sum().backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert torch.allclose(got, want.detach(), atol=2e-2)
    # relative to the whole gradient: the softmax part is ~5 % of it here, so an elementwise tolerance would pass a
    # backward that got it wrong
    assert (h.grad.float() - want_grad.float()).norm() / want_grad.float().norm() < 1e-2
    planned = c * tc * v * budget.logprob_bytes(2)
    assert extra <= planned * 1.05 + 16 * MiB, (extra / MiB, planned / MiB)


def _graph_model(folder: str, dtype: str, quant: str = "none"):
    """The tiny model on CUDA with a non-zero adapter, and 4 left-padded prompts of unequal lengths."""
    from tinyrl import policy
    from tinyrl.types import Example, PromptBatch

    model, tok, _ = policy.load_policy(folder, quant=quant, dtype=dtype, device="cuda", lora_rank=4, lora_alpha=8,
                                       grad_checkpointing=False, seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    texts = ["<|user|>" + "what is 12 + 30? " * (1 + 3 * i) + "<eos><|assistant|>" for i in range(4)]
    enc = tok(texts, return_tensors="pt", padding=True, padding_side="left")
    return model, tok, PromptBatch(tuple(Example(f"q{i}", "1", i) for i in range(4)), ("",) * 4, enc["input_ids"],
                                   enc["attention_mask"])


def _launches(fn) -> int:
    """Kernel and graph launches the host issues while fn runs (bench/profile_gpu.py counts them)."""
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    from profile_gpu import launches

    return launches(fn, torch.device("cuda"))


def _greedy_logits(model, tok, prompts, mode: str, monkeypatch, steps: int = 96):
    """Greedy decoding's tokens [b, Tc] and each step's logits [Tc, b, V], recorded on the device (index_copy_ at a
    device counter), so the steps a CUDA graph replays are recorded as the eager ones are."""
    from tinyrl import policy

    real, record = policy.next_tokens, {}

    def recording(logits, *args, **kwargs):
        if not record:  # the first step is eager in every mode: nothing is allocated inside a capture
            record["logits"] = torch.full((steps, *logits.shape), float("nan"), device=logits.device)
            record["at"] = torch.zeros(1, dtype=torch.long, device=logits.device)
        record["logits"].index_copy_(0, record["at"], logits.float()[None])
        record["at"].add_(1)
        return real(logits, *args, **kwargs)

    monkeypatch.setattr(policy.generation, "next_tokens", recording)
    try:
        ids = policy.generate(model, tok, prompts, group_size=8, max_new_tokens=steps, gen_batch=32, greedy=True,
                              decode_mode=mode).completion_ids
    finally:
        monkeypatch.setattr(policy.generation, "next_tokens", real)
    return ids, record["logits"].cpu()


def _same_logits_until_a_near_tie(eager: tuple, graph: tuple, rel: float) -> int:
    """Per step, the rows whose tokens so far are equal get logits equal within rel x the largest; where such a row
    then picks another token, it was a near-tie (eager's logits of the two tokens within 2 rel). Returns how many
    (step, row) logit vectors were compared."""
    (e_ids, e_logits), (g_ids, g_logits) = eager, graph
    compared = 0
    for t in range(e_ids.shape[1]):
        same = (e_ids[:, :t] == g_ids[:, :t]).all(1) & e_logits[t, :, 0].isfinite() & g_logits[t, :, 0].isfinite()
        if not same.any():
            break
        e, g = e_logits[t][same], g_logits[t][same]
        scale = e.abs().max()
        assert (e - g).abs().max() <= rel * scale, (t, float((e - g).abs().max() / scale))
        flipped = e_ids[same, t] != g_ids[same, t]
        if flipped.any():
            rows = e[flipped]
            gap = rows.gather(1, e_ids[same, t][flipped, None]) - rows.gather(1, g_ids[same, t][flipped, None])
            assert gap.max() <= 2 * rel * scale, (t, float(gap.max() / scale))
        compared += int(same.sum())
    return compared


@pytest.mark.parametrize("dtype,quant", [("fp32", "none"), ("bf16", "none"), ("bf16", "4bit")])
def test_graph_decoding_computes_the_logits_of_eager_decoding(tmp_path, monkeypatch, dtype, quant):
    """decode=auto on CUDA replays one captured graph per token, with eager decoding's logits at every step (to
    rounding: attention over the whole buffer may round differently, so a token may flip on a near-tie; compared
    step by step, not by a share of equal tokens, which one early flip ruins), captured once per generate batch
    without falling back, and a small fraction of eager decoding's kernel launches."""
    if quant == "4bit":
        pytest.importorskip("bitsandbytes")
    from tiny import make_tiny_model

    from tinyrl import decoding, policy

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # fp32 matmuls in fp32
    model, tok, prompts = _graph_model(make_tiny_model(str(tmp_path / "model"), hidden=256, layers=4), dtype, quant)
    captures = []
    real_capture = decoding.StaticStep.capture
    monkeypatch.setattr(decoding.StaticStep, "capture", lambda self: captures.append(real_capture(self)) or
                        captures[-1])
    monkeypatch.setattr(decoding, "_failed", set())
    rel = 1e-4 if dtype == "fp32" else 4 * 2**-7
    eager = _greedy_logits(model, tok, prompts, "eager", monkeypatch)
    graph = _greedy_logits(model, tok, prompts, "auto", monkeypatch)
    assert len(captures) == 1 and not decoding._failed  # one batch of 32 rows, captured, no step synced
    assert _same_logits_until_a_near_tie(eager, graph, rel) >= 32 * 8  # at least 8 steps of every row

    def run(mode):
        torch.manual_seed(11)
        return policy.generate(model, tok, prompts, group_size=8, max_new_tokens=96, gen_batch=16,
                               decode_mode=mode, min_new_tokens=96).completion_ids

    eager_launches, graph_launches = _launches(lambda: run("eager")), _launches(lambda: run("auto"))
    assert len(captures) == 1 + 2  # 2 more batches of 16
    assert graph_launches * 5 < eager_launches, (graph_launches, eager_launches)


def test_a_training_step_waits_for_the_device_the_same_number_of_times_for_any_micro_batch(tmp_path):
    """The step's own host syncs are per step (the batch to the device, the loss and KL back, the gradient norm),
    not per micro-batch; what remains per micro-batch is transformers' mask check in each decoder call (at most
    3: reference, forward, checkpointed recompute). And the optimizer is the fused AdamW."""
    import warnings

    from tiny import make_tiny_model

    from tinyrl import loop
    from tinyrl.config import Config
    from tinyrl.types import TrainBatch

    folder = make_tiny_model(str(tmp_path / "model"), hidden=256, layers=4)
    cfg = Config(task="toy", model=folder, out=str(tmp_path / "run"), device="cuda", quant="none", dtype="bf16",
                 lora_rank=4, logprob_chunk=1)
    parts = loop.load_parts(cfg, None, quiet=True)
    assert parts.optimizer.param_groups[0]["fused"] is True
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(6, 80, (8, 40), generator=g)
    mask = torch.ones(8, 40, dtype=torch.long)
    mask[::2, :5] = 0  # left padding on half the rows
    cmask = torch.ones(8, 20)
    cmask[1::2, 15:] = 0
    batch = TrainBatch(input_ids=ids, attention_mask=mask, completion_mask=cmask,
                       advantages=torch.linspace(-1, 1, 8))

    def syncs(micro_batch: int) -> int:
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                loop.train_step(parts.model, parts.optimizer, batch, loop.with_overrides(cfg, micro_batch=micro_batch),
                                parts.device)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchronizing" in str(w.message) for w in caught)

    syncs(8)  # warm-up (lazy initialisation syncs once)
    one, four = syncs(8), syncs(2)
    print(f"host syncs per step: {one} with 1 micro-batch, {four} with 4")
    assert four - one <= 3 * 3, (one, four)
