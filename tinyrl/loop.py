"""The tinyrl training loop: GRPO (+ Memory-R+) on a LoRA/QLoRA policy; with evaluate.py, the one that wires stages.

One optimizer step, top to bottom in `fit`: sample P examples -> render prompts -> generate G completions each ->
score (task rewards [+ memory]) -> group advantages -> loss/backward over micro-batches -> clip, AdamW step -> log
-> checkpoint. Deviations from the paper (docs/design.md): LoRA/QLoRA instead of full fine-tuning; the reference
policy is the same weights with the adapter disabled; completion log-probs are computed row-chunked.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import random
import time
import types
from typing import Any

import numpy as np
import torch

from tinyrl import budget, checkpoint, encoder, evaluate, faults, grpo, memory, meter, policy, prompts, tasks
from tinyrl import config as config_mod
from tinyrl import task as task_mod
from tinyrl.config import Config
from tinyrl.errors import Stopped, UserError
from tinyrl.types import Rollouts, Scored
from tinyrl.update import accumulate, old_logprobs, train_step, update  # noqa: F401 - tests patch them here


def fit(cfg: Config, quiet: bool = False, pins: frozenset[str] = frozenset(), resume: bool = False,
        data: Any = None, test_data: Any = None, reward_funcs: tuple = ()) -> str:
    """Train (or resume) the run in cfg.out; returns the run folder. `pins`: settings the user set by hand, which
    the --vram planner keeps. `resume`: --resume was given, so config.RESUMABLE settings may differ from the run's.
    `data`, `test_data` (Python rows or Datasets) and `reward_funcs` (callables) add to what cfg names (tinyrl.task).
    A signal stops it at the next batch boundary, dropping the step in progress, with a checkpoint at the step's
    start (errors.Stopped); `max_minutes` stops it between steps likewise, returning."""
    begun = time.perf_counter()
    checkpoint.check_writable(cfg.out)
    planned = None
    if cfg.vram:  # the planner picks every memory setting before any weight loads
        planned = make_plan(cfg, pins, budget.detect_caps(cfg.device))
        cfg = with_overrides(cfg, **planned.knobs())
        if not quiet:
            print(budget.format_plan(planned), flush=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    with faults.RunLock(cfg.out) as lock, faults.StopRequests() as stops, faults.deterministic(cfg.deterministic):
        task = task_mod.build(cfg, data, reward_funcs, warn=None if quiet else meter.notice)
        held_out = task_mod.held_out(cfg, test_data, cfg.eval_limit) if cfg.eval_every else []
        total = cfg.steps or max(1, cfg.epochs * len(task.train) // cfg.prompts_per_step)
        changes, _ = checkpoint.check_run(cfg, resume, total)  # refused before minutes of loading, not after
        random.seed(cfg.seed)
        parts = dataclasses.replace(load_parts(cfg, planned, quiet), stops=stops)
        os.makedirs(cfg.out, exist_ok=True)  # only now: a bad task or model leaves no run folder behind
        lock.acquire()  # before the run folder is touched
        run = checkpoint.prepare_run(cfg, resume, total)
        torch.manual_seed(cfg.seed)
        state = checkpoint.resume(run, parts.model, parts.optimizer, parts.memory, warn=meter.notice)
        start, cfg, backoffs = checkpoint.restore(state, cfg, parts.scaler)
        log = meter.Meter(run, total, start, quiet=quiet, oom_backoffs=backoffs, cfg=cfg)
        log.data_position = (state or {}).get("data_position", start * cfg.prompts_per_step)  # prompts drawn so far
        if changes:
            meter.notice(f"--resume: changed {', '.join(changes)}")
        log.echo(f"{'resuming' if state else 'starting'} {run}: {cfg.task} with {cfg.model}, method {cfg.method}, "
                 f"step {start}/{total}, P={cfg.prompts_per_step} G={cfg.group_size} on {parts.device}")
        saved, step_times, save_s, skipped = start, [], 0.0, 0
        try:
            for step in range(start, total):
                began_step = (checkpoint.rng_state(), list(random.getstate()))  # put back if the step is dropped
                dropped = stops.signal or faults.past_deadline(time.perf_counter() - begun, step_times, save_s,
                                                               60 * cfg.max_minutes)
                if not dropped:
                    try:
                        metrics, cfg = take_step(parts, cfg, task, step, log)
                    except faults.Abandoned:  # a stop request inside the step: as if it came before it
                        checkpoint.set_rng_state(*began_step)
                        dropped = True
                if dropped:
                    note = "" if saved == step else f"; checkpoint {save(run, step, parts, cfg, log)} saved"
                    why = stops.signal or f"max_minutes={cfg.max_minutes:g} (the next step would end past it)"
                    message = f"stopped at step {step}/{total} by {why}{note}; rerun the same command to resume"
                    if stops.signal:
                        raise Stopped(message, stops.code)
                    meter.notice(message)
                    break
                step_times.append(metrics["time/step"])
                metrics.update(planned.metrics() if planned else {})
                if cfg.eval_every and (step + 1) % cfg.eval_every == 0:
                    began = time.perf_counter()
                    metrics.update(evaluate.during_fit(parts.model, parts.tokenizer, held_out, cfg, task))
                    step_times[-1] += time.perf_counter() - began  # the deadline counts evaluation too
                log.log(metrics)
                skipped = skipped + 1 if metrics["amp/skipped"] else 0
                if skipped >= cfg.max_skipped_steps:
                    kept, dtype = checkpoint.latest_name(run), policy.causal_lm(parts.model).dtype
                    raise UserError(faults.nonfinite_message(skipped, metrics, cfg.lr, dtype, kept))
                if (step + 1) % cfg.sample_every == 0 or step == 0:
                    log.samples(step + 1, log.pending_samples)
                if (step + 1) % cfg.save_every == 0 or step + 1 == total:
                    began = time.perf_counter()
                    save(run, step + 1, parts, cfg, log)
                    saved, save_s = step + 1, time.perf_counter() - began
        finally:
            log.close()
    log.echo(meter.report(run))
    return run


@dataclasses.dataclass(frozen=True)
class Parts:
    """What fit loads once and every step uses."""

    model: Any  # peft model: LoRA (or QLoRA) adapter on the base
    tokenizer: Any
    device: torch.device
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None  # dynamic loss scaling, for fp16 compute only
    encoder: Any  # sentence encoder for the memory methods, else None
    memory: memory.MemoryState | None
    stops: faults.StopRequests | None = None  # SIGINT/SIGTERM, acted on at batch boundaries inside a step


def load_parts(cfg: Config, planned, quiet: bool) -> Parts:
    """The policy (capped to the --vram budget on CUDA), its optimizer and loss scaler, and the memories."""
    model, tokenizer, device = policy.load_policy(
        cfg.model, quant=cfg.quant, dtype=cfg.dtype, device=cfg.device, lora_rank=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha, grad_checkpointing=cfg.grad_checkpointing, seed=cfg.seed, backend=cfg.backend)
    if planned and device.type == "cuda":  # hold the run to the budget, so "fits in 8G" holds on any larger card
        meter.cap_cuda_memory(budget.parse_bytes(cfg.vram), budget.CUDA_CONTEXT_BYTES, device, quiet)
    trainable = [p for p in model.parameters() if p.requires_grad]  # LoRA weights: fp32 whatever the compute dtype
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.weight_decay, fused=device.type == "cuda")  # one kernel
    fp16 = policy.causal_lm(model).dtype == torch.float16  # fp16 gradients underflow without a loss scale
    scaler = torch.amp.GradScaler(device.type) if fp16 else None
    enc = mem = None
    if cfg.method.startswith("memory"):  # Memory-R+: the sentence encoder and both episodic memories
        enc = encoder.load(cfg.encoder, device.type)
        mem = memory.MemoryState(memory.MemorySettings.from_config(cfg, enc.dim))
    model.train()  # from_pretrained leaves eval mode, in which transformers skips gradient checkpointing
    return Parts(model, tokenizer, device, optimizer, scaler, enc, mem)


def take_step(parts: Parts, cfg: Config, task: task_mod.Task, step: int, log) -> tuple[dict, Config]:
    """One optimizer step: sample, score, remember, advantages, GRPO update; its metrics and the config (an OOM
    back-off may lower gen_batch or micro_batch); its sample rows left on the meter; faults.Abandoned on a stop."""
    timings, peaks, started = {}, {}, time.perf_counter()  # seconds and peak bytes by phase
    model, device = parts.model, parts.device
    phase = functools.partial(meter.phase, timings, peaks, device=device)
    rollouts, scored, memory_stats, cfg = draw(parts, cfg, task, log.data_position, step, log, phase)
    drawn, sampling = cfg.prompts_per_step, {}
    if cfg.dynamic_sampling:
        rollouts, scored, drawn, sampling, cfg = resample(parts, cfg, task, step, log, phase, rollouts, scored)
    adv = grpo.advantages(scored.total, cfg.group_size, scale=cfg.scale_rewards)  # [P*G]
    with phase("train"):
        lr = grpo.lr_at(step, log.total, cfg.lr, cfg.warmup_ratio)  # a function of the step: resume-safe
        for group in parts.optimizer.param_groups:
            group["lr"] = lr
        batch = grpo.train_batch(rollouts, adv, cfg.mask_truncated)
        # with a memory this step's writes are done, and after a first update the weights moved: a stop then waits
        # for the step's end
        exact = parts.memory is None and cfg.iterations == 1
        old, clips = (old_logprobs(model, batch, cfg, device) if cfg.iterations > 1 else None), []
        for _ in range(cfg.iterations):
            (loss, kl), cfg = faults.with_oom_backoff(lambda c: accumulate(model, parts.optimizer, batch, c, device,
                parts.scaler, faults.at_boundary(parts.stops, log, step, "training", exact), old, clips), cfg,
                "micro_batch", log)
            result = update(parts.optimizer, parts.scaler, cfg.max_grad_norm, loss, kl)
    timings["step"] = time.perf_counter() - started
    if device.type == "cuda":  # what nvidia-smi shows for this run: the allocator's peak + the context
        peaks["device"] = peaks["reserved"] + meter.cuda_outside_torch(device)
    metrics = meter.step_metrics(step + 1, rollouts, scored, result, lr=lr, timings=timings, peaks=peaks)
    log.data_position += drawn  # the step is done: a resume draws from here
    metrics.update({**sampling, "oom/backoffs": log.oom_backoffs, "oom/gen_batch": cfg.gen_batch,
                    "oom/micro_batch": cfg.micro_batch, **({"data/skipped_gold": task.skipped} if task.skipped else {})})
    if clips:  # TRL's clip_ratio: shares of the ratios clipped, over the step's updates
        low, high, total = (sum(c[i] for c in clips) for i in range(3))
        metrics.update({"clip/low": low / max(1, total), "clip/high": high / max(1, total)})
    if memory_stats:
        metrics.update(memory_stats, **{"time/memory_share": timings["memory"] / timings["step"]})
    log.pending_samples = meter.sample_rows(rollouts, scored, n=4)
    return metrics, cfg


def draw(parts: Parts, cfg: Config, task: task_mod.Task, start: int, step: int, log, phase):
    """P prompts from data position `start`: rendered, G completions each generated, scored and remembered."""
    batch = tasks.examples_at(task.train, start, cfg.prompts_per_step, cfg.seed)
    rendered = prompts.render(batch, parts.tokenizer, cfg.max_prompt_tokens, few_shot=cfg.few_shot,
                              seed=cfg.seed, system_prompt=task.system_prompt)
    with phase("generate"):
        rollouts, cfg = faults.with_oom_backoff(lambda c: policy.generate(
            parts.model, parts.tokenizer, rendered, group_size=c.group_size, max_new_tokens=c.max_new_tokens,
            gen_batch=c.gen_batch, temperature=c.temperature, top_p=c.top_p,
            min_new_tokens=c.min_new_tokens, decode_mode=c.decode,
            on_batch=faults.at_boundary(parts.stops, log, step, "generating")), cfg, "gen_batch", log)
    with phase("score"):
        scored = task_mod.score(task, cfg, rollouts, step)
    memory_stats = {}
    if parts.memory is not None:
        with phase("memory"):
            scored, memory_stats = remember(parts.encoder, parts.memory, rollouts, scored)
    return rollouts, scored, memory_stats, cfg


def resample(parts: Parts, cfg: Config, task: task_mod.Task, step: int, log, phase, rollouts, scored):
    """Dynamic sampling: keep the groups whose success differs within the group; draw P more prompts while fewer than
    P are kept, up to max_draws batches. No informative group at all: the last batch as it is (advantages 0)."""
    p, kept, draws, count = cfg.prompts_per_step, [], 1, 0
    while True:
        keep = grpo.informative(scored.correct, cfg.group_size)  # [P]
        keep &= keep.cumsum(0) <= p - count  # at most P in all
        kept.append((rollouts, scored, keep))
        count += int(keep.sum())
        if count >= p or draws >= cfg.max_draws:
            break
        rollouts, scored, _, cfg = draw(parts, cfg, task, log.data_position + draws * p, step, log, phase)
        draws += 1
    metrics = {"sampling/draws": draws, "sampling/dropped": 1 - count / (draws * p), "sampling/groups": count}
    if count:
        rollouts, scored = grpo.join(kept)
    return rollouts, scored, draws * p, metrics, cfg


def save(run: str, step: int, parts: Parts, cfg: Config, log) -> str:
    """Checkpoint `step` with the loop's own state: the data position, the OOM back-off's settings and count, and the
    loss scale."""
    state = {"data_position": log.data_position,
             "oom": {"gen_batch": cfg.gen_batch, "micro_batch": cfg.micro_batch, "logprob_chunk": cfg.logprob_chunk,
                     "backoffs": log.oom_backoffs}, **({"scaler": parts.scaler.state_dict()} if parts.scaler else {})}
    return os.path.basename(checkpoint.save(run, step, parts.model, parts.optimizer, state, parts.memory,
                                            keep=cfg.keep_checkpoints))


def make_plan(cfg: Config, pins: frozenset[str], caps) -> budget.Plan:
    """The --vram plan: model geometry from config.json (no weights), prompt lengths from a sample of the task
    rendered with the model's tokenizer when one is at hand (else the prompt cap), the user's settings pinned."""
    name = "HuggingFaceTB/SmolLM2-135M-Instruct" if cfg.model in policy.ALIASES else cfg.model
    model_config = budget.load_model_config(name)
    policy.check_plain_logits(types.SimpleNamespace(**model_config), cfg.model)  # refused before any plan is shown
    geometry = budget.geometry_from_config(model_config, name=cfg.model)
    if not policy.scoring.prompt_sharing_available():  # this transformers scores every row with its own prompt
        geometry = dataclasses.replace(geometry, full_attention=False)
    lengths = [cfg.max_prompt_tokens]
    try:
        sample = tasks.for_run(cfg, "train", 64)
        tokenizer = policy.load_tokenizer(policy.resolve_model(cfg.model))
        rendered = prompts.render(sample, tokenizer, cfg.max_prompt_tokens, few_shot=cfg.few_shot,
                                  seed=cfg.seed, system_prompt=task_mod.system_prompt(cfg.task))
        lengths = rendered.attention_mask.sum(-1).tolist()
    except (UserError, OSError, ValueError):
        pass  # no data or tokenizer offline: plan for full-length prompts, the safe side
    return budget.plan_for(cfg, geometry, lengths, caps, pins)


def remember(enc, mem, rollouts: Rollouts, scored: Scored) -> tuple[Scored, dict]:
    """Memory-R+ for the whole step: one batched encode (questions + reasoning spans), one batched write/read; each
    completion stored and recalled under its own question. Adds the weighted exploit/explore rewards."""
    g = rollouts.group_size
    questions = [ex.question for ex in rollouts.prompts.examples]  # P
    started = time.perf_counter()
    vecs = enc.encode(questions + [encoder.reasoning_span(c) for c in rollouts.completions])  # [P + P*G, D]
    encode_ms = (time.perf_counter() - started) * 1000
    keys = np.repeat(vecs[:len(questions)], g, axis=0)  # [P*G, D]
    out = mem.step([q for q in questions for _ in range(g)], keys, vecs[len(questions):],
                   scored.correct.numpy())
    s = mem.settings
    components = dict(scored.components)
    components["exploit"] = torch.from_numpy(s.exploit_weight * out.exploit).float()  # [P*G]
    if s.explore_weight:
        components["explore"] = torch.from_numpy(s.explore_weight * out.explore).float()  # [P*G]
    stats = {**out.metrics(), **{f"memory/{k}": v for k, v in mem.stats().items()},
             "time/memory_encode_ms": encode_ms, "time/memory_total_ms": out.timing_ms["total"] + encode_ms}
    return dataclasses.replace(scored, components=components), stats


def with_overrides(cfg: Config, **changes) -> Config:
    return config_mod.validate(dataclasses.replace(cfg, **changes))
