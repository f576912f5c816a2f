"""Policy: chunked log-probs equal the full computation; QLoRA on CPU keeps correct gradients after generate."""

import math

import pytest
import torch

from tinyrl import policy
from tinyrl.types import Example, PromptBatch


def load(tiny_model, quant="none", checkpointing=False, dtype="fp32", lora_alpha=8):
    model, tok, _ = policy.load_policy(tiny_model, quant=quant, dtype=dtype, device="cpu", lora_rank=4,
                                       lora_alpha=lora_alpha, grad_checkpointing=checkpointing, seed=0)
    with torch.no_grad():  # make the adapter non-zero so policy != reference
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model, tok


def batch(tok, texts):
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return enc.input_ids, enc.attention_mask


def full_logprobs(model, ids, mask, tc):
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float()  # [B, T, V]
    logp = torch.log_softmax(logits[:, -tc - 1:-1], -1)  # [B, Tc, V]
    return logp.gather(-1, ids[:, -tc:].unsqueeze(-1)).squeeze(-1)  # [B, Tc]


@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_chunked_logprobs_equal_unchunked(tiny_model, chunk):
    model, tok = load(tiny_model, checkpointing=True)
    ids, mask = batch(tok, ["a 12 + 3 = 15", "b 7", "hello there 99", "x"])
    want = full_logprobs(model, ids, mask, 3)
    with torch.no_grad():
        got = policy.completion_logprobs(model, ids, mask, 3, chunk)
    assert torch.allclose(got, want, atol=1e-5)
    # with autograd (checkpointed chunks) the values and the gradients match too
    model.train()
    got = policy.completion_logprobs(model, ids, mask, 3, chunk)
    got.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    full_logprobs(model, ids, mask, 3).sum().backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.allclose(grads[n], p.grad, atol=1e-5), n


def test_reference_is_the_adapter_disabled_model(tiny_model):
    model, tok = load(tiny_model)
    ids, mask = batch(tok, ["a 12 + 3 = 15", "b 7"])
    ref = policy.reference_logprobs(model, ids, mask, 4, 2)
    with torch.no_grad():
        base = full_logprobs(model.get_base_model(), ids, mask, 4)
        with model.disable_adapter():
            off = full_logprobs(model, ids, mask, 4)
        on = policy.completion_logprobs(model, ids, mask, 4, 2)
    assert torch.allclose(ref, off, atol=1e-6)
    assert not torch.allclose(ref, on, atol=1e-4)  # the adapter matters, so the reference really is different
    assert base.shape == ref.shape


def test_generate_masks_after_eos(tiny_model):
    model, tok = load(tiny_model)
    ex = (Example("q1", "1", 0), Example("q2", "2", 1))
    ids, mask = batch(tok, ["<|user|>hi<eos><|assistant|>", "<|user|>a longer one<eos><|assistant|>"])
    prompts = PromptBatch(ex, ("", ""), ids, mask)
    torch.manual_seed(0)
    out = policy.generate(model, tok, prompts, group_size=3, max_new_tokens=12, gen_batch=4)
    assert out.completion_ids.shape == (6, 12) and len(out.completions) == 6
    lengths = out.completion_mask.sum(-1)
    for row, n, cut in zip(out.completion_ids, lengths, out.truncated):
        n = int(n)
        assert (row[n:] == tok.pad_token_id).all()
        assert cut or row[n - 1] == tok.eos_token_id


def test_generate_restores_train_mode_after_an_out_of_memory_error(tiny_model, monkeypatch):
    """The loop catches an OOM in generation and retries with a smaller gen_batch: the model must come back in
    train mode, or gradient checkpointing is silently off for the rest of the run."""
    model, tok = load(tiny_model, checkpointing=True)
    model.train()
    ids, mask = batch(tok, ["<|user|>hi<eos><|assistant|>"])
    prompts = PromptBatch((Example("q1", "1", 0),), ("",), ids, mask)

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("simulated")

    monkeypatch.setattr(policy.generation, "decode", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError, match="simulated"):
        policy.generate(model, tok, prompts, group_size=2, max_new_tokens=4, gen_batch=2)
    assert model.training and all(m.training for m in model.modules())


@pytest.mark.parametrize("gen_batch", [6, 4, 3, 1])  # all rows; straddling two prompts; within one; one row
def test_shared_prefill_gives_the_same_completions(tiny_model, gen_batch):
    """Prefilling each prompt once for its G completions changes nothing: greedy and seeded sampled completions
    equal those of prefilling every row, prompts of different lengths (left padding) included."""
    model, tok = load(tiny_model)
    ex = (Example("q1", "1", 0), Example("q2", "2", 1))
    ids, mask = batch(tok, ["<|user|>hi<eos><|assistant|>", "<|user|>a longer one<eos><|assistant|>"])
    prompts = PromptBatch(ex, ("", ""), ids, mask)
    for greedy in (True, False):
        outs = []
        for share in (True, False):
            torch.manual_seed(0)
            outs.append(policy.generate(model, tok, prompts, group_size=3, max_new_tokens=12, gen_batch=gen_batch,
                                        greedy=greedy, share_prefill=share).completion_ids)
        assert torch.equal(*outs)
    assert len(set(map(tuple, outs[0].tolist()))) > 1  # sampled rows differ: the rows were not all copies


def test_shared_prefill_runs_each_prompt_once(tiny_model):
    model, tok = load(tiny_model)
    ids, mask = batch(tok, ["<|user|>hi<eos><|assistant|>", "<|user|>a longer one<eos><|assistant|>"])
    seen = []
    decoder = policy.causal_lm(model).get_decoder()
    hook = decoder.register_forward_pre_hook(lambda mod, args, kwargs: seen.append(kwargs["input_ids"].shape),
                                             with_kwargs=True)
    try:
        cache = policy.shared_prefill(model, ids, mask, torch.tensor([0, 0, 0, 1, 1]))
    finally:
        hook.remove()
    assert seen == [torch.Size([2, ids.shape[1] - 1])]  # two distinct prompts, all but the last token
    keys = cache.layers[0].keys  # [5, heads, Tp-1, hd]: rows 0-2 share prompt 0, rows 3-4 prompt 1
    assert keys.shape[0] == 5 and torch.equal(keys[0], keys[2]) and torch.equal(keys[3], keys[4])
    assert not torch.equal(keys[0], keys[3])


def test_each_batch_cache_is_freed_before_the_next_prefill(tiny_model, monkeypatch):
    """The planner counts one batch's KV cache at a time: the previous batch's must be gone when the next
    batch's prompts are prefilled."""
    import weakref

    model, tok = load(tiny_model)
    ids, mask = batch(tok, ["<|user|>hi<eos><|assistant|>", "<|user|>a longer one<eos><|assistant|>"])
    prompts = PromptBatch((Example("q1", "1", 0), Example("q2", "2", 1)), ("", ""), ids, mask)
    made, alive_at_next = [], []
    real = policy.shared_prefill

    def tracking(*args, **kwargs):
        alive_at_next.extend(ref() is not None for ref in made)
        cache = real(*args, **kwargs)
        made.append(weakref.ref(cache))
        return cache

    monkeypatch.setattr(policy.generation, "shared_prefill", tracking)
    policy.generate(model, tok, prompts, group_size=3, max_new_tokens=8, gen_batch=2)
    assert len(made) == 3 and alive_at_next == [False] * 3  # 6 rows in 3 batches; no cache outlived its batch


def grads_after(model, ids, mask):
    model.zero_grad()
    policy.completion_logprobs(model, ids, mask, 4, 2).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_qlora_on_cpu_gradient_unchanged_by_generate(tiny_model):
    pytest.importorskip("bitsandbytes")
    model, tok = load(tiny_model, quant="4bit", checkpointing=True)
    assert "Linear4bit" in type(model.get_base_model().model.layers[0].self_attn.q_proj.base_layer).__name__
    ids, mask = batch(tok, ["a 12 + 3 = 15", "b 7 and 8"])
    model.train()
    before = grads_after(model, ids, mask)
    prompts = PromptBatch((Example("q", "1", 0),), ("",), ids[:1], mask[:1])
    policy.generate(model, tok, prompts, group_size=2, max_new_tokens=5, gen_batch=2)
    model.train()
    after = grads_after(model, ids, mask)
    assert before.keys() == after.keys() and len(before) > 0
    for name in before:
        assert torch.allclose(before[name], after[name], atol=1e-6), name
    assert any(g.abs().sum() > 0 for g in after.values())


def group_batch(tok, prompts, completions, group_size):
    """[P*G, Tp+Tc] rows: left-padded prompts repeated G times, then right-padded completions."""
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    p_ids, p_mask = enc.input_ids.repeat_interleave(group_size, 0), enc.attention_mask.repeat_interleave(group_size, 0)
    rows = [tok(c, add_special_tokens=False).input_ids for c in completions]
    tc = max(map(len, rows))
    c_ids = torch.tensor([r + [tok.pad_token_id] * (tc - len(r)) for r in rows])
    c_mask = torch.tensor([[1] * len(r) + [0] * (tc - len(r)) for r in rows])
    return torch.cat([p_ids, c_ids], 1), torch.cat([p_mask, c_mask], 1), c_mask.float(), tc


@pytest.mark.parametrize("checkpointing", [False, True])
def test_shared_prompt_scoring_equals_per_row(tiny_model, monkeypatch, checkpointing):
    model, tok = load(tiny_model, checkpointing=checkpointing)
    model.train()
    ids, mask, cmask, tc = group_batch(tok, ["<|user|>hi 12<eos><|assistant|>", "<|user|>a longer one<eos><|assistant|>"],
                                       ["ab1", "x9z", "7", "hello", "=2", "q"], 3)

    def run():
        model.zero_grad()
        logp = policy.completion_logprobs(model, ids, mask, tc, 2)  # [6, Tc]
        (logp * cmask).sum().backward()
        ref = policy.reference_logprobs(model, ids, mask, tc, 2)
        return logp.detach(), ref, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    decoder = policy.causal_lm(model).get_decoder()
    rows_seen = []
    hook = decoder.register_forward_pre_hook(lambda m, args, kwargs: rows_seen.append(len(kwargs["input_ids"])),
                                             with_kwargs=True)
    shared = run()
    assert rows_seen[:2] == [2, 6]  # the 2 prompts once, then the 6 completions: the shared path ran
    hook.remove()
    monkeypatch.setattr(policy.scoring, "can_share_prompt", lambda decoder: False)
    per_row = run()
    assert torch.allclose(shared[0], per_row[0], atol=1e-5) and torch.allclose(shared[1], per_row[1], atol=1e-5)
    assert shared[2].keys() == per_row[2].keys()
    for name, grad in shared[2].items():
        assert torch.allclose(grad, per_row[2][name], atol=1e-5), name
    assert any(grad.abs().max() > 1e-3 for grad in shared[2].values())  # the comparison is not of zeros


def test_shared_prompt_scoring_runs_each_prompt_once(tiny_model):
    model, tok = load(tiny_model, checkpointing=True)
    ids, mask, _, tc = group_batch(tok, ["<|user|>hi<eos><|assistant|>", "<|user|>again<eos><|assistant|>"],
                                   ["a", "b", "c", "d"], 2)
    decoder = policy.causal_lm(model).get_decoder()
    shapes = []
    hook = decoder.register_forward_pre_hook(lambda m, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)),
                                             with_kwargs=True)
    try:
        policy.completion_logprobs(model, ids, mask, tc, 4).sum().backward()
    finally:
        hook.remove()
    tp = ids.shape[1] - tc
    assert shapes == [(2, tp - 1), (4, tc)]  # 2 prompts once (all but their last token), then 4 completions


@pytest.mark.parametrize(("config", "shared"), [
    ({}, True), ({"sliding_window": 4}, False), ({"sliding_window": 4, "use_sliding_window": False}, True),
    ({"layer_types": ["full_attention", "sliding_attention"]}, False)])
def test_models_with_sliding_windows_score_each_row(config, shared):
    """The policy shares prompts exactly where the planner assumes it does (budget.full_attention)."""
    from types import SimpleNamespace

    from tinyrl import budget

    decoder = torch.nn.Module()
    decoder.config = SimpleNamespace(**config)
    assert policy.can_share_prompt(decoder) == budget.full_attention(config) == shared


def test_shared_prompt_scoring_on_qwen2():
    """Qwen2 (biases on q/k/v): the decoder's own hidden states and gradients match, without peft."""
    from transformers import Qwen2Config, Qwen2Model

    torch.manual_seed(0)
    decoder = Qwen2Model(Qwen2Config(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, pad_token_id=0))
    prompts = torch.tensor([[0, 5, 6, 7], [8, 9, 10, 11]]).repeat_interleave(2, 0)  # [4, 4], one left-padded
    ids = torch.cat([prompts, torch.randint(1, 50, (4, 3))], 1)  # [4, 7]
    mask = (ids != 0).long()

    def run(share):
        decoder.zero_grad()
        if share:
            hidden = policy.completion_hidden(decoder, ids, mask, 3)
        else:
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            hidden = decoder(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state[:, -4:-1]
        hidden.pow(2).sum().backward()
        return hidden.detach(), {n: p.grad.clone() for n, p in decoder.named_parameters() if p.grad is not None}

    assert policy.can_share_prompt(decoder)  # so run(True) really takes the shared path
    (h1, g1), (h2, g2) = run(True), run(False)
    assert torch.allclose(h1, h2, atol=1e-5)
    assert g1.keys() == g2.keys()
    for name in g1:
        assert torch.allclose(g1[name], g2[name], atol=1e-4), name


def test_next_tokens_samples_the_tempered_softmax_and_its_nucleus():
    torch.manual_seed(0)
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05])).repeat(40_000, 1)  # [40000, 4]
    freq = torch.bincount(policy.next_tokens(logits, 1.0, 1.0, False), minlength=4) / 40_000
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.01)
    hot = torch.softmax(logits[0] / 0.5, -1)  # temperature 0.5 sharpens: [0.68, 0.25, 0.06, 0.007]
    freq = torch.bincount(policy.next_tokens(logits, 0.5, 1.0, False), minlength=4) / 40_000
    assert torch.allclose(freq, hot, atol=0.01)
    # top_p 0.7: the smallest head reaching 0.7 is {0.5, 0.3}, renormalised to 0.625 / 0.375
    freq = torch.bincount(policy.next_tokens(logits, 1.0, 0.7, False), minlength=4) / 40_000
    assert freq[2] == freq[3] == 0 and abs(freq[0] - 0.625) < 0.01
    # each row its own nucleus, mapped back to vocabulary ids: the reversed row keeps tokens 3 and 2
    both = torch.stack([logits[0], logits[0].flip(0)]).repeat(20_000, 1)  # [40000, 4] alternating rows
    picked = policy.next_tokens(both, 1.0, 0.7, False).view(20_000, 2)
    assert set(picked[:, 0].tolist()) == {0, 1} and set(picked[:, 1].tolist()) == {3, 2}
    assert abs((picked[:, 1] == 3).float().mean() - 0.625) < 0.015


def test_sampling_ignores_the_models_generation_defaults(tiny_model):
    """Only the sampling settings tinyrl asks for shape the samples: a repetition penalty or top-k in the model's
    generation_config (Qwen2.5-Instruct ships both) must not. HF `generate` would apply them."""
    model, tok = load(tiny_model)
    ids, mask = batch(tok, ["<|user|>hi<eos><|assistant|>", "<|user|>a longer one<eos><|assistant|>"])
    prompts = PromptBatch((Example("q1", "1", 0), Example("q2", "2", 1)), ("", ""), ids, mask)

    def run(greedy):
        torch.manual_seed(0)
        return policy.generate(model, tok, prompts, group_size=2, max_new_tokens=16, gen_batch=4,
                               greedy=greedy).completion_ids

    clean = run(True), run(False)
    config = policy.causal_lm(model).generation_config
    with torch.no_grad():  # HF's own greedy decoding agrees with tinyrl's on a model without defaults
        hf = policy.causal_lm(model).generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False,
                                              pad_token_id=tok.pad_token_id, eos_token_id=policy.eos_ids(model, tok))
    hf = torch.nn.functional.pad(hf[:, ids.shape[1]:], (0, 16 - (hf.shape[1] - ids.shape[1])), value=tok.pad_token_id)
    assert torch.equal(clean[0][::2], hf)
    config.repetition_penalty, config.top_k, config.no_repeat_ngram_size = 100.0, 1, 2
    assert torch.equal(run(True), clean[0]) and torch.equal(run(False), clean[1])


def test_min_new_tokens_holds_eos_back_and_decoding_stops_when_all_rows_end(tiny_model):
    model, tok = load(tiny_model)
    ids, mask = batch(tok, ["<|user|>hi<eos><|assistant|>", "<|user|>a longer one<eos><|assistant|>"])
    prompts = PromptBatch((Example("q1", "1", 0), Example("q2", "2", 1)), ("", ""), ids, mask)
    head = policy.causal_lm(model).get_output_embeddings()
    steps = []
    hook = head.register_forward_hook(lambda m, args, out: (steps.append(1), out.index_add(
        -1, torch.tensor([tok.eos_token_id]), torch.full((*out.shape[:-1], 1), 50.0)))[1])  # EOS all but certain
    try:
        out = policy.generate(model, tok, prompts, group_size=2, max_new_tokens=20, gen_batch=4, min_new_tokens=5)
    finally:
        hook.remove()
    assert (out.completion_mask.sum(-1) == 6).all()  # 5 tokens, then the EOS
    assert (out.completion_ids[:, 5] == tok.eos_token_id).all() and not out.truncated.any()
    assert len(steps) == 6  # stopped once every row had ended, not after 20 steps


def test_one_token_prompts_are_scored_row_by_row(tiny_model):
    """Nothing to share when the prompt is a single token: the per-row path, same values."""
    model, tok = load(tiny_model)
    ids = torch.tensor([[3, 10, 11], [3, 12, 13]])  # a 1-token prompt, 2-token completions
    mask = torch.ones_like(ids)
    with torch.no_grad():
        got = policy.completion_logprobs(model, ids, mask, 2, 2)
        want = full_logprobs(model, ids, mask, 2)
    assert torch.allclose(got, want, atol=1e-5)


def test_planner_and_policy_agree_on_prompt_sharing_support(monkeypatch):
    """Where transformers lacks the checkpoint switch the policy scores each row, and so does the plan."""
    from tinyrl import budget, loop
    from tinyrl.config import Config

    assert policy.prompt_sharing_available()  # the installed transformers has it
    cfg = Config(task="toy", model="smollm2-135m", vram="2G")
    cpu = budget.DEVICES["cpu"]  # where training shares prompts (policy.share_scoring)
    shared = loop.make_plan(cfg, frozenset(), cpu)
    monkeypatch.setattr(policy.scoring, "prompt_sharing_available", lambda: False)
    assert not policy.can_share_prompt(torch.nn.Module())
    per_row = loop.make_plan(cfg, frozenset(), cpu)
    assert per_row.breakdown.training > shared.breakdown.training


def test_the_fit_plan_counts_the_configured_top_p():
    from dataclasses import replace

    from tinyrl import loop
    from tinyrl.config import Config

    cfg = Config(task="toy", model="smollm2-135m", vram="2G")
    pins = frozenset({"gen_batch"})  # the same batch, so only the per-logit bytes differ
    full = loop.make_plan(cfg, pins, budget_caps()).breakdown.term("sampling logits").bytes
    nucleus = loop.make_plan(replace(cfg, top_p=0.9), pins, budget_caps()).breakdown.term("sampling logits").bytes
    assert nucleus * 16 == full * 40  # a T4: CUDA's top-p sort (budget.SAMPLING_BYTES)


def budget_caps():
    from tinyrl import budget

    return budget.device_caps("T4")


@pytest.mark.parametrize("quant,dtype", [("none", "fp32"), ("none", "bf16"), ("4bit", "bf16")])
def test_lean_lora_is_bit_identical_to_peft_and_undone_after(tiny_model, quant, dtype):
    if quant == "4bit":
        pytest.importorskip("bitsandbytes")
    model, tok = load(tiny_model, quant=quant, dtype=dtype, lora_alpha=6)  # scale 1.5: rounding order shows
    model.eval()
    ids, mask = batch(tok, ["a 12 + 3 = 15", "b 7"])
    lora_layers = [m for m in model.modules() if hasattr(m, "lora_A")]
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
        with policy.lean_lora(model):
            assert all("forward" in vars(m) for m in lora_layers) and len(lora_layers) >= 7
            got = model(input_ids=ids, attention_mask=mask).logits
        assert not any("forward" in vars(m) for m in lora_layers)  # peft's forward again
        with model.disable_adapter(), policy.lean_lora(model):  # a disabled adapter keeps peft's own path
            assert not any("forward" in vars(m) for m in lora_layers)
        with pytest.raises(RuntimeError), policy.lean_lora(model):  # an error inside still restores peft's forward
            with policy.lean_lora(model):  # nested: the inner one leaves the outer one's closures alone
                raise RuntimeError
        assert not any("forward" in vars(m) for m in lora_layers)
    assert torch.equal(got, want)


def test_generate_runs_lean_and_samples_what_peft_would(tiny_model, monkeypatch):
    import contextlib

    model, tok = load(tiny_model)
    ids, mask = batch(tok, ["<|user|>hi<eos><|assistant|>", "<|user|>a longer one<eos><|assistant|>"])
    prompts = PromptBatch((Example("q1", "1", 0), Example("q2", "2", 1)), ("", ""), ids, mask)

    def sample():
        torch.manual_seed(3)
        return policy.generate(model, tok, prompts, group_size=2, max_new_tokens=10, gen_batch=4).completion_ids

    lean, entered = sample(), []
    real = policy.lean_lora
    monkeypatch.setattr(policy.generation, "lean_lora", lambda m: entered.append(m) or real(m))
    assert torch.equal(sample(), lean) and entered == [model]
    monkeypatch.setattr(policy.generation, "lean_lora", lambda m: contextlib.nullcontext())
    assert torch.equal(sample(), lean)  # peft's forward samples exactly the same tokens


@pytest.mark.parametrize("extra", [{"use_dora": True}, {"lora_dropout": 0.1}])
def test_lean_lora_leaves_dora_and_dropout_to_peft(tiny_model, extra):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    config = LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": "all-linear", **extra})
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model), config)
    lora_layers = [m for m in model.modules() if hasattr(m, "lora_A")]
    with policy.lean_lora(model):
        assert lora_layers and not any("forward" in vars(m) for m in lora_layers)


def test_planner_knows_whether_decoding_repeats_kv(tiny_model, monkeypatch):
    """budget.decode_repeats_kv says what the installed transformers does in a left-padded decoding step of a
    grouped-query model (the tiny model has 4 heads on 2 K/V heads): repeat K/V to every head, or not."""
    import transformers.integrations.sdpa_attention as sdpa

    from tinyrl import budget

    model, tok = load(tiny_model)
    ids, mask = batch(tok, ["<|user|>hi<eos><|assistant|>", "<|user|>a longer one<eos><|assistant|>"])
    prompts = PromptBatch((Example("q1", "1", 0), Example("q2", "2", 1)), ("", ""), ids, mask)
    keys = []  # the length of every key repeat_kv is given
    real = sdpa.repeat_kv
    monkeypatch.setattr(sdpa, "repeat_kv", lambda h, n: keys.append(h.shape[2]) or real(h, n))
    policy.generate(model, tok, prompts, group_size=2, max_new_tokens=3, gen_batch=4)
    decoding = [n for n in keys if n >= ids.shape[1]]  # the prefill's keys are all but the last prompt token
    assert bool(decoding) == budget.decode_repeats_kv()


def test_decode_frees_each_steps_logits_before_the_next_forward(tiny_model, monkeypatch):
    """The plan's decoding step is a max of moments (growth, attention, sampling), so no [b, V] logits may be
    alive while the next step's decoder runs."""
    import gc

    model, tok = load(tiny_model)
    ids, mask = batch(tok, ["<|user|>hi<eos><|assistant|>", "<|user|>a longer one<eos><|assistant|>"])
    prompts = PromptBatch((Example("q1", "1", 0), Example("q2", "2", 1)), ("", ""), ids, mask)
    vocab = model.get_output_embeddings().weight.shape[0]
    decoder = policy.causal_lm(model).get_decoder()
    alive = []

    def counting(*args, **kwargs):
        alive.append(sum(1 for o in gc.get_objects() if torch.is_tensor(o) and o.dim() == 2 and o.shape[1] == vocab))
        return type(decoder).forward(decoder, *args, **kwargs)

    monkeypatch.setattr(decoder, "forward", counting)
    policy.generate(model, tok, prompts, group_size=2, max_new_tokens=4, gen_batch=4, min_new_tokens=4)
    assert len(alive) == 5 and alive == [0] * 5  # the prefill, then 4 decoding steps


def test_laid_out_cache_samples_the_same_tokens_and_never_grows(tiny_model, monkeypatch):
    """shared_prefill lays the cache out at full length once (policy.lay_out); decoding then writes in place
    and samples exactly what the torch.cat-grown cache does."""
    model, tok = load(tiny_model)
    ids, mask = batch(tok, ["<|user|>hi<eos><|assistant|>", "<|user|>a longer one<eos><|assistant|>"])
    prompts = PromptBatch((Example("q1", "1", 0), Example("q2", "2", 1)), ("", ""), ids, mask)

    def sample():
        torch.manual_seed(5)
        return policy.generate(model, tok, prompts, group_size=3, max_new_tokens=9, gen_batch=6,
                               min_new_tokens=9).completion_ids

    storage, laid = [], []
    real_lay_out, real_decode = policy.lay_out, policy.decode

    def spying_lay_out(cache, rows, room):
        laid.append(real_lay_out(cache, rows, room))
        return laid[-1]

    def spying_decode(model_, input_ids, attention_mask, cache, **kw):
        out = real_decode(model_, input_ids, attention_mask, cache, **kw)
        storage.append([(layer.keys.untyped_storage().data_ptr(), layer.buffers[0].untyped_storage().data_ptr(),
                         layer.keys.shape[-2], layer.buffers[0].shape[-2]) for layer in cache.layers])
        return out

    monkeypatch.setattr(policy.generation, "lay_out", spying_lay_out)
    monkeypatch.setattr(policy.generation, "decode", spying_decode)
    laid_out = sample()
    from tinyrl import budget

    assert laid == [True] == [budget.cache_lays_out()]  # the planner assumes what the policy does
    with pytest.raises(RuntimeError, match="only appends"):
        policy.shared_prefill(model, ids, mask, torch.tensor([0, 0, 1]), room=2).layers[0].batch_select_indices(
            torch.tensor([0]))
    for keys_at, buffer_at, filled, length in storage[0]:
        assert keys_at == buffer_at  # the layer's keys are still a view of the buffer allocated once
        assert filled == length  # exactly full: the prompt's last token and 8 of the 9 new ones were fed
    monkeypatch.setattr(policy.generation, "lay_out", lambda cache, rows, room: False)
    monkeypatch.setattr(policy.generation, "decode", real_decode)
    assert torch.equal(sample(), laid_out)  # the grown cache: the same tokens


def test_token_logprob_by_hand():
    # V=3, D=2: logits = h W^T = [1, 0, 0], target 0 -> logp = 1 - log(e + 2), d logp / d h = (onehot - p) W
    h = torch.tensor([[[1.0, 0.0]]], requires_grad=True)  # [1, 1, 2]
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    logp = policy._TokenLogprob.apply(h, w, None, torch.tensor([[0]]))
    e = math.e
    assert logp.item() == pytest.approx(1 - math.log(e + 2), abs=1e-6)
    logp.sum().backward()
    assert h.grad.flatten().tolist() == pytest.approx([1 - e / (e + 2), -1 / (e + 2)], abs=1e-6)


def test_token_logprob_at_a_temperature_by_hand():
    # T = 0.5, D = 1: logits = [0, ln 2, ln 3] / 2, so logits / T = ln [1, 2, 3] and softmax = [1, 2, 3] / 6.
    # Target 2: logp = ln(3/6) = -ln 2; d logp / d logits = (onehot - p) / T = [-1/3, -2/3, 1] = d logp / d W (h = 1)
    h = torch.tensor([[[1.0]]], requires_grad=True)  # [1, 1, 1]
    w = torch.tensor([[0.0], [math.log(2) / 2], [math.log(3) / 2]], requires_grad=True)  # [3, 1]
    logp = policy._TokenLogprob.apply(h, w, None, torch.tensor([[2]]), 0.5)
    assert logp.item() == pytest.approx(-math.log(2), abs=1e-6)
    logp.sum().backward()
    assert w.grad.flatten().tolist() == pytest.approx([-1 / 3, -2 / 3, 1], abs=1e-6)
    assert h.grad.item() == pytest.approx(math.log(3) / 2 - math.log(2) / 3, abs=1e-6)  # sum_v (d logp / d logit_v) W_v


def values_and_grads(logprobs, head, h, g):
    """logprobs() and the gradients of sum(logprobs() * g) w.r.t. h, the head's weight and its bias (if any)."""
    leaves = [x for x in (h, head.weight, head.bias) if x is not None]
    for x in leaves:
        x.grad = None
    got = logprobs()
    (got * g).sum().backward()
    return got.detach(), [x.grad.clone() for x in leaves]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_token_logprobs_match_autograd_of_the_tempered_log_softmax(dtype, bias, temperature):
    """Both paths, the hand-written one and the general one, score log softmax(logits / T)[target], values and
    gradients (hidden, weight, bias) alike, and so does the no-grad path of the reference pass."""
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=bias).to(dtype)
    h = torch.randn(3, 5, 16, dtype=dtype, requires_grad=True)
    t = torch.randint(0, 50, (3, 5))
    g = torch.randn(3, 5)  # an uneven upstream gradient
    want, want_grads = values_and_grads(lambda: torch.log_softmax(head(h).float() / temperature, -1).gather(
        -1, t.unsqueeze(-1)).squeeze(-1), head, h, g)
    plain = values_and_grads(lambda: policy._TokenLogprob.apply(h, head.weight, head.bias, t, temperature), head, h, g)
    general = values_and_grads(lambda: policy._token_logprobs(head, h, t, temperature), head, h, g)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for got, got_grads in (plain, general):
        assert torch.allclose(got, want, atol=tol)
        for a, b in zip(got_grads, want_grads, strict=True):
            assert a.dtype == b.dtype and torch.allclose(a.float(), b.float(), atol=tol, rtol=tol)
    if temperature != 1.0:  # it matters
        assert not torch.allclose(want, policy._token_logprobs(head, h, t).detach(), atol=0.1)
    with torch.no_grad():  # the no-grad path (reference pass) gives the same values
        assert torch.allclose(policy._logprob_and_lse(h, head.weight, head.bias, t, temperature)[0], want, atol=tol)


@pytest.mark.parametrize("hooked", [False, True])  # the hand-written path; the general one (checkpointed with grad)
def test_completion_logprobs_score_at_the_sampling_temperature(tiny_model, hooked):
    model, tok = load(tiny_model, checkpointing=True)
    model.train()
    ids, mask = batch(tok, ["a 12 + 3 = 15", "b 7"])
    if hooked:
        policy.causal_lm(model).get_output_embeddings().register_forward_hook(lambda *a: None)
    pos = policy.positions(mask)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -4:-1].float()  # [2, 3, V]
        with model.disable_adapter():
            ref_logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -4:-1].float()
    targets = ids[:, -3:, None]  # [2, 3, 1]
    want = torch.log_softmax(logits / 0.9, -1).gather(-1, targets).squeeze(-1)  # [2, 3]
    want_ref = torch.log_softmax(ref_logits / 0.9, -1).gather(-1, targets).squeeze(-1)  # [2, 3]
    got = policy.completion_logprobs(model, ids, mask, 3, 1, temperature=0.9)
    assert got.requires_grad and torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(policy.reference_logprobs(model, ids, mask, 3, 1, temperature=0.9), want_ref, atol=1e-5)
    with torch.no_grad():
        today = policy.completion_logprobs(model, ids, mask, 3, 1)
        assert torch.equal(policy.completion_logprobs(model, ids, mask, 3, 1, temperature=1.0), today)
        assert torch.allclose(policy.completion_logprobs(model, ids, mask, 3, 1, temperature=0.9), want, atol=1e-5)
    assert not torch.allclose(today, want, atol=1e-3)  # the temperature matters here


def test_heads_that_are_not_plain_linears_use_autograd(tiny_model, monkeypatch):
    model, tok = load(tiny_model)
    ids, mask = batch(tok, ["a 12 + 3 = 15", "b 7"])
    used = []
    monkeypatch.setattr(policy._TokenLogprob, "apply", lambda *a: used.append(1) or torch.zeros(2, 3))
    policy.completion_logprobs(model, ids, mask, 3, 2)
    assert used  # a plain Linear head takes the hand-written backward
    used.clear()
    head = policy.causal_lm(model).get_output_embeddings()
    head.register_forward_hook(lambda *a: None)  # e.g. an offloading hook: the module must run
    logp = policy.completion_logprobs(model, ids, mask, 3, 2)
    assert not used and logp.shape == (2, 3)


@pytest.mark.parametrize("key,value", [("final_logit_softcapping", 30.0), ("logit_scale", 0.0625),
                                       ("logits_scaling", 8.0)])
def test_models_that_transform_their_logits_are_refused_in_one_line(tiny_model, tmp_path, key, value):
    import json
    import shutil

    from tinyrl.errors import UserError

    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, key: value}))
    with pytest.raises(UserError) as err:
        load(str(folder))
    assert key in str(err.value) and "\n" not in str(err.value)
    for plain in (None,) if key == "final_logit_softcapping" else (None, 1.0):  # the neutral values load
        policy.check_plain_logits(type("Config", (), {key: plain})(), "m")


@pytest.mark.parametrize("card, major, expected", [("Tesla T4", 7, torch.float16), ("Tesla V100", 7, torch.float16),
                                                   ("Tesla P100", 6, torch.float16),
                                                   ("NVIDIA A100", 8, torch.bfloat16)])
def test_dtype_auto_takes_bf16_only_where_the_card_computes_it_natively(monkeypatch, card, major, expected):
    """#22: torch.cuda.is_bf16_supported() counts emulation by default (True on a T4), so dtype=auto ran emulated
    bf16 there and never took the fp16 + loss-scaling path. pick_dtype and the planner's detect_caps agree."""
    from types import SimpleNamespace

    from tinyrl import budget

    props = SimpleNamespace(name=card, total_memory=16 << 30, major=major, minor=0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation
                        or major >= 8)
    assert policy.pick_dtype("auto", torch.device("cuda")) == expected
    assert budget.detect_caps("auto").bf16 == (expected == torch.bfloat16)
    assert policy.pick_dtype("auto", torch.device("cpu")) == torch.float32
