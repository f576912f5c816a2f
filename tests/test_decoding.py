"""Shape-static decoding (tinyrl.decoding), the step a CUDA graph captures: on CPU, without the graph, it samples
exactly the tokens of eager decoding, keeps every tensor's shape and address, and reads "all rows ended" every few
tokens. The graph itself is tested on CUDA (tests/test_gpu.py)."""

import pytest
import torch

from tinyrl import config, decoding, policy
from tinyrl.errors import UserError
from tinyrl.types import Example, PromptBatch

TEXTS = ["<|user|>hi<eos><|assistant|>", "<|user|>a longer one<eos><|assistant|>", "<|user|>x<eos><|assistant|>"]


def load(tiny_model, quant="none", dtype="fp32"):
    model, tok, _ = policy.load_policy(tiny_model, quant=quant, dtype=dtype, device="cpu", lora_rank=4, lora_alpha=8,
                                       grad_checkpointing=False, seed=0)
    with torch.no_grad():  # a non-zero adapter: the LoRA layers take part
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model, tok


def prompt_batch(tok, texts=TEXTS):
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)  # left-padded, unequal lengths
    return PromptBatch(tuple(Example(f"q{i}", "1", i) for i in range(len(texts))), ("",) * len(texts),
                       enc.input_ids, enc.attention_mask)


def sample(model, tok, prompts, mode, seed=3, **kw):
    torch.manual_seed(seed)
    settings = dict(group_size=4, max_new_tokens=20, gen_batch=5) | kw  # batches of 5, 5 and 2 rows
    return policy.generate(model, tok, prompts, decode_mode=mode, **settings)


@pytest.mark.parametrize("quant", ["none", "4bit"])
@pytest.mark.parametrize("kw", [dict(greedy=True), dict(), dict(top_p=0.8), dict(min_new_tokens=6)],
                         ids=["greedy", "sampled", "top_p", "min_new_tokens"])
def test_static_decoding_samples_the_tokens_of_eager_decoding(tiny_model, quant, kw):
    if quant == "4bit":
        pytest.importorskip("bitsandbytes")
    model, tok = load(tiny_model, quant)
    prompts = prompt_batch(tok)
    static, calls = [], []
    real = decoding.decode_static
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(decoding, "decode_static", lambda *a, **k: calls.append(1) or real(*a, **k))
        static = sample(model, tok, prompts, "static", **kw)
    eager = sample(model, tok, prompts, "eager", **kw)
    assert len(calls) == 3  # every batch decoded statically
    assert torch.equal(static.completion_ids, eager.completion_ids)
    assert torch.equal(static.completion_mask, eager.completion_mask)
    assert static.completions == eager.completions and torch.equal(static.truncated, eager.truncated)
    assert eager.completion_mask.sum() > 3 * 4  # the rows did write tokens
    if not kw:  # seeded: another seed samples otherwise (the draws are the seed's, not fixed)
        assert not torch.equal(sample(model, tok, prompts, "static", seed=4).completion_ids, static.completion_ids)


def test_bf16_static_logits_equal_eager_ones_to_rounding(tiny_model, monkeypatch):
    """In bf16 the attention over the whole buffer (masked) and over the filled part may round differently: the
    logits agree to within a few bf16 steps, and greedy tokens almost always."""
    model, tok = load(tiny_model, dtype="bf16")
    prompts = prompt_batch(tok)
    seen: dict[str, list] = {}
    real = policy.next_tokens

    def spy(logits, *args, **kwargs):
        seen.setdefault(mode, []).append(logits.clone())
        return real(logits, *args, **kwargs)

    monkeypatch.setattr(policy.generation, "next_tokens", spy)
    for mode in ("eager", "static"):
        sample(model, tok, prompts, mode, greedy=True, group_size=1, gen_batch=3, max_new_tokens=6, min_new_tokens=6)
    for eager, static in zip(seen["eager"], seen["static"], strict=True):
        finite = eager.isfinite()
        assert torch.equal(finite, static.isfinite())
        assert (eager[finite] - static[finite]).abs().max() <= 4 * 2**-7 * eager[finite].abs().max()


def test_the_static_step_keeps_every_shape_and_address(tiny_model, monkeypatch):
    """What a CUDA graph replays must read and write the same memory every token: the decoder's inputs and the
    cache's buffers keep their shape and data pointer, and nothing grows."""
    model, tok = load(tiny_model)
    decoder = policy.causal_lm(model).get_decoder()
    seen = []

    def spying(*args, **kwargs):
        cache = kwargs[policy.cache_keyword(model)]
        tensors = [kwargs["input_ids"], kwargs["attention_mask"], kwargs["position_ids"]]
        tensors += [t for layer in cache.layers for t in (layer.keys, layer.values)]
        out = type(decoder).forward(decoder, *args, **kwargs)
        seen.append([(t.data_ptr(), tuple(t.shape)) for t in tensors + [out.last_hidden_state]])
        return out

    prompts = prompt_batch(tok)
    monkeypatch.setattr(decoding, "CHECK_EVERY", 1000)
    monkeypatch.setattr(policy.generation, "shared_prefill", spied_prefill(decoder, spying, monkeypatch))
    sample(model, tok, prompts, "static", group_size=2, gen_batch=6, max_new_tokens=12)
    assert len(seen) == 12
    inputs = [step[:-1] for step in seen]
    assert all(step == inputs[0] for step in inputs)


def spied_prefill(decoder, spying, monkeypatch):
    """policy.shared_prefill, after which every decoder call goes through `spying`."""
    real = policy.shared_prefill

    def prefill(*args, **kwargs):
        cache = real(*args, **kwargs)
        monkeypatch.setattr(decoder, "forward", spying)
        return cache

    return prefill


def test_ended_rows_are_read_every_few_tokens(tiny_model, monkeypatch):
    """The host asks whether every row has ended every CHECK_EVERY tokens (each ask waits for the device); the
    steps in between only write pads after the rows' EOS, which generate drops."""
    model, tok = load(tiny_model)
    prompts = prompt_batch(tok)
    eos = policy.eos_ids(model, tok)
    steps = []
    real_step = decoding.StaticStep.step
    monkeypatch.setattr(decoding.StaticStep, "step", lambda self: steps.append(1) or real_step(self))
    # every row ends at its 3rd token: the EOS is the only token allowed from then on
    real_next = policy.next_tokens
    counter = iter(range(10**6))

    def ending(logits, *args, **kwargs):
        if next(counter) >= 2:
            logits = torch.full_like(logits, -torch.inf).index_fill_(-1, torch.tensor(eos[:1]), 0.0)
        return real_next(logits, *args, **kwargs)

    monkeypatch.setattr(policy.generation, "next_tokens", ending)
    out = sample(model, tok, prompts, "static", group_size=1, gen_batch=3, max_new_tokens=40)
    assert len(steps) == decoding.CHECK_EVERY  # not 40, and not 3: the first read after every row ended
    assert out.completion_ids.shape == (3, 40) and out.completion_mask.sum(-1).tolist() == [3.0, 3.0, 3.0]


def test_caches_that_are_not_laid_out_decode_eagerly(tiny_model, monkeypatch):
    """Sliding-window models (no laid-out cache) and 1-token prompts (no cache) take the eager loop."""
    model, tok = load(tiny_model)
    monkeypatch.setattr(policy.generation, "lay_out", lambda cache, rows, room: False)
    monkeypatch.setattr(decoding, "decode_static", lambda *a, **k: pytest.fail("decoded statically"))
    out = sample(model, tok, prompt_batch(tok), "static", greedy=True)
    monkeypatch.undo()
    assert torch.equal(out.completion_ids, sample(model, tok, prompt_batch(tok), "eager", greedy=True).completion_ids)


def test_decode_modes():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert [decoding.mode_for(m, cpu) for m in decoding.MODES] == ["eager", "eager", "static", "static"]
    assert [decoding.mode_for(m, cuda) for m in decoding.MODES] == ["graph", "eager", "static", "graph"]
    assert config.FIELDS["decode"].default == "auto"
    with pytest.raises(UserError, match="decode='fast': choose one of auto, eager, static, graph"):
        config.validate(config.Config(decode="fast"))


def test_the_static_step_needs_a_laid_out_cache_and_an_attention_that_takes_a_4d_mask():
    from types import SimpleNamespace as NS

    laid, grown = NS(layers=[NS(buffers=(None, None))] * 2), NS(layers=[NS(buffers=(None, None)), NS()])
    assert decoding.supported(laid, NS(_attn_implementation="sdpa"))
    assert decoding.supported(laid, NS(_attn_implementation="eager"))
    assert not decoding.supported(laid, NS(_attn_implementation="flash_attention_2"))
    assert not decoding.supported(grown, NS(_attn_implementation="sdpa"))
    assert not decoding.supported(None, NS(_attn_implementation="sdpa"))  # 1-token prompts: no cache


class FakeCuda:
    """Enough of torch.cuda for decode_static(graphs=True) to run its control flow on a CPU, with CUDA's semantics
    where they matter: torch.cuda.graph empties the cache before it captures; a capture records the step without its
    effects (the step's state is put back as it was) and each replay runs it. With `sync_in_step` the step waits
    for the host: under the sync debug mode "warn" that is a warning, inside a capture it invalidates the capture.
    A capture that fails otherwise than by OOM leaves the allocator "capturing" (torch 2.11-2.13: graph.__exit__ has
    no try/finally), after which every empty_cache fails, as on a real card."""

    def __init__(self, fail: Exception | None = None, sync_in_step: bool = False):
        self.fail, self.sync_in_step = fail, sync_in_step
        self.captures = self.replays = self.emptied = 0
        self.mode, self.modes, self.capturing_now, self.stuck, self.invalid = 0, [], False, False, False

    def install(self, monkeypatch):
        from contextlib import nullcontext
        from types import SimpleNamespace

        stream = SimpleNamespace(wait_stream=lambda other: None)
        for name, value in {"Stream": lambda: stream, "current_stream": lambda: stream,
                            "stream": lambda s: nullcontext(), "synchronize": lambda: None,
                            "empty_cache": self.empty_cache, "CUDAGraph": self.graph_class(),
                            "graph": self.capturing, "set_sync_debug_mode": self.set_mode,
                            "get_sync_debug_mode": lambda: self.mode}.items():
            monkeypatch.setattr(torch.cuda, name, value, raising=False)
        real_init, real_step = decoding.StaticStep.__init__, decoding.StaticStep.step
        fake = self

        def init(state, *args, **kwargs):
            real_init(state, *args, **kwargs)
            fake.state = state

        def step(state):
            if fake.sync_in_step:
                fake.host_sync()
            real_step(state)

        monkeypatch.setattr(decoding.StaticStep, "__init__", init)
        monkeypatch.setattr(decoding.StaticStep, "step", step)

    def set_mode(self, mode):
        self.mode = {"default": 0, "warn": 1, "error": 2}.get(mode, mode)
        self.modes.append(self.mode)

    def host_sync(self):
        import warnings

        if self.capturing_now:
            self.invalid = True
        elif self.mode == 1:
            warnings.warn("called a synchronizing CUDA operation", UserWarning)

    def empty_cache(self):
        if self.stuck:
            raise RuntimeError("captures_underway.empty() INTERNAL ASSERT FAILED")
        self.emptied += 1

    def graph_class(self):
        fake = self

        class Graph:
            def replay(self):
                fake.replays += 1
                fake.state.step()

        return Graph

    def capturing(self, graph, capture_error_mode="global"):
        import contextlib

        fake = self

        @contextlib.contextmanager
        def capture():
            fake.empty_cache()  # as torch.cuda.graph.__enter__
            state = fake.state
            tensors = [t for t in vars(state).values() if torch.is_tensor(t)]
            tensors += [b for layer in state.cache.layers for b in layer.buffers]
            saved = [t.clone() for t in tensors]
            fake.captures += 1
            fake.capturing_now = True
            try:
                yield
            finally:
                fake.capturing_now = False
                for t, s in zip(tensors, saved):  # a capture runs nothing: the step's writes are undone
                    t.copy_(s)
            if fake.invalid or fake.fail is not None:
                fake.stuck = not isinstance(fake.fail, torch.cuda.OutOfMemoryError)
                raise fake.fail or RuntimeError("CUDA error: operation not permitted when stream is capturing")

        return capture()


@pytest.mark.parametrize("kw", [dict(greedy=True), dict(min_new_tokens=20)], ids=["greedy", "sampled"])
def test_graph_mode_warms_up_captures_once_per_batch_and_replays_the_rest(tiny_model, monkeypatch, kw):
    """decode_static's CUDA-graph control flow, run on a CPU with a fake torch.cuda: WARMUP_STEPS eager steps (the
    last under the sync debug mode, which is put back), one capture per generate batch, a replay for every later
    token; the cache emptied before each capture (by torch.cuda.graph) and once after the last batch; the same
    tokens as eager decoding."""
    model, tok = load(tiny_model)
    prompts = prompt_batch(tok)
    eager = sample(model, tok, prompts, "eager", **kw)
    fake = FakeCuda()
    fake.install(monkeypatch)
    monkeypatch.setattr(decoding, "mode_for", lambda mode, device: "graph")
    graph = sample(model, tok, prompts, "graph", **kw)
    assert torch.equal(graph.completion_ids, eager.completion_ids)
    assert fake.captures == 3 and fake.emptied == 3 + 1  # 3 batches: before each capture, once after the last
    assert fake.modes == [1, 0] * 3 and fake.mode == 0
    if "min_new_tokens" in kw:  # every row runs all 20 tokens: 2 warm-up steps, 18 replays per batch
        assert fake.replays == 3 * (20 - decoding.WARMUP_STEPS)


def test_a_step_that_waits_for_the_host_is_never_captured(tiny_model, monkeypatch, capsys):
    """#22: a capture that fails cannot be undone (the allocator stays "capturing"), so a step that syncs (dynamic
    RoPE reads position_ids.max()) is found in the warm-up and decodes without a graph: the same tokens, one line."""
    model, tok = load(tiny_model)
    prompts = prompt_batch(tok)
    eager = sample(model, tok, prompts, "eager", min_new_tokens=20)
    fake = FakeCuda(sync_in_step=True)
    fake.install(monkeypatch)
    monkeypatch.setattr(decoding, "mode_for", lambda mode, device: "graph")
    monkeypatch.setattr(decoding, "_failed", set())
    graph = sample(model, tok, prompts, "graph", min_new_tokens=20)
    assert torch.equal(graph.completion_ids, eager.completion_ids)
    assert fake.captures == 0 and fake.replays == 0 and not fake.stuck and fake.mode == 0
    err = capsys.readouterr().err
    assert err.count("decoding without CUDA graphs: a decoding step waits for the host (called a synchronizing "
                     "CUDA operation)") == 1


def test_a_capture_that_fails_all_the_same_stops_with_one_line_naming_eager_decoding(tiny_model, monkeypatch):
    """A capture that fails although the warm-up step made no sync: one line naming --set decode=eager, and no
    empty_cache after it (on a real card that would be torch's INTERNAL ASSERT instead). An OOM in capture ends
    it cleanly and reaches the loop's back-off."""
    model, tok = load(tiny_model)
    prompts = prompt_batch(tok)
    fake = FakeCuda(fail=RuntimeError("operation not permitted when stream is capturing\nmore"))
    fake.install(monkeypatch)
    monkeypatch.setattr(decoding, "mode_for", lambda mode, device: "graph")
    with pytest.raises(UserError, match=r"^CUDA graph capture failed \(RuntimeError: operation not permitted when "
                                        r"stream is capturing\); rerun the same command with --resume --set "
                                        r"decode=eager"):
        sample(model, tok, prompts, "graph", min_new_tokens=20)
    assert fake.captures == 1 and fake.stuck
    fake.fail, fake.stuck = torch.cuda.OutOfMemoryError("CUDA out of memory"), False
    with pytest.raises(torch.cuda.OutOfMemoryError):  # for the loop's back-off to halve gen_batch
        sample(model, tok, prompts, "graph", min_new_tokens=20)
    assert not fake.stuck


def test_a_run_stopped_by_a_failed_capture_resumes_with_eager_decoding(tiny_model, monkeypatch, tmp_path):
    """The failed capture at step 3 leaves the step-2 checkpoint as it was; the command the message names
    (--resume --set decode=eager) resumes there and finishes."""
    from tinyrl import checkpoint, loop

    fake = FakeCuda()
    fake.install(monkeypatch)
    monkeypatch.setattr(decoding, "mode_for", lambda mode, device: mode if mode == "eager" else "graph")
    real_capture = decoding.StaticStep.capture

    def fail_from_step_3(state):
        if fake.captures >= 2:  # one generate batch a step: the third capture is step 3's
            fake.fail = RuntimeError("operation not permitted when stream is capturing")
        return real_capture(state)

    monkeypatch.setattr(decoding.StaticStep, "capture", fail_from_step_3)
    cfg = config.Config(task="toy", model=tiny_model, out=str(tmp_path / "run"), steps=4, prompts_per_step=2,
                        group_size=2, max_new_tokens=6, gen_batch=4, device="cpu", save_every=2, decode="graph")
    with pytest.raises(UserError, match="--set decode=eager"):
        loop.fit(cfg, quiet=True)
    assert sorted(checkpoint.steps(cfg.out)) == [2]
    fake.stuck = False  # a new process
    run = loop.fit(config.apply_overrides(cfg, ["decode=eager"]), quiet=True, resume=True)
    assert max(checkpoint.steps(run)) == 4
