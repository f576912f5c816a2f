"""The tinyrl training loop: GRPO (+ Memory-R+) on a LoRA/QLoRA policy. The only module that wires the stages.

One optimizer step, top to bottom in `fit`:
    sample P examples -> render prompts -> generate G completions each -> score (task rewards [+ memory])
    -> group advantages -> loss/backward over micro-batches -> clip, AdamW step -> log -> checkpoint

Deviations from the paper (docs/design.md): LoRA/QLoRA instead of full fine-tuning; the reference policy is the
same weights with the adapter disabled; completion log-probs are computed row-chunked.

    tinyrl fit arith --model smollm2-135m --steps 20 --out runs/demo
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import time
import types
from typing import Any

import torch

import numpy as np

from tinyrl import (budget, checkpoint, encoder, evaluate, faults, grpo, memory, meter, policy, prompts, rewards,
                    tasks)
from tinyrl import config as config_mod
from tinyrl.config import Config
from tinyrl.errors import Stopped, UserError
from tinyrl.types import Example, Rollouts, Scored, StepResult, TrainBatch


def fit(cfg: Config, quiet: bool = False, pins: frozenset[str] = frozenset(), resume: bool = False) -> str:
    """Train (or resume) the run in cfg.out; returns the run folder. `pins`: settings the user set by hand, which
    the --vram planner keeps. `resume`: --resume was given, so config.RESUMABLE settings may differ from the run's.
    A signal stops it at a step boundary with a checkpoint (errors.Stopped); `max_minutes` likewise, returning."""
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
        train = tasks.load_task(cfg.task, cfg.data, "train", cfg.seed, None)
        held_out = tasks.load_task(cfg.task, cfg.data, "test", cfg.seed, cfg.eval_limit) if cfg.eval_every else []
        total = cfg.steps or max(1, len(train) // cfg.prompts_per_step)
        changes, _ = checkpoint.check_run(cfg, resume, total)  # refused before minutes of loading, not after
        random.seed(cfg.seed)
        parts = load_parts(cfg, planned, quiet)
        os.makedirs(cfg.out, exist_ok=True)  # only now: a bad task or model leaves no run folder behind
        lock.acquire()  # before the run folder is touched
        run = checkpoint.prepare_run(cfg, resume, total)
        torch.manual_seed(cfg.seed)
        state = checkpoint.resume(run, parts.model, parts.optimizer, parts.memory, warn=meter.notice)
        start, cfg = restore(state, cfg, parts.scaler)
        for name in ("metrics.jsonl", "samples.jsonl"):  # the steps after the checkpoint run again
            meter.truncate_jsonl(os.path.join(run, name), start)
        log = meter.Meter(run, total, start, quiet=quiet)
        log.oom_backoffs = state["oom"]["backoffs"] if state and "oom" in state else 0
        if changes:
            schedule = any(c.startswith("steps ") for c in changes)
            meter.notice(f"--resume: changed {', '.join(changes)}"
                         + ("; the lr schedule follows the new total" if schedule else ""))
        log.echo(f"{'resuming' if state else 'starting'} {run}: {cfg.task} with {cfg.model}, method {cfg.method}, "
                 f"step {start}/{total}, P={cfg.prompts_per_step} G={cfg.group_size} on {parts.device}")
        saved, step_times, save_s, skipped = start, [], 0.0, 0
        try:
            for step in range(start, total):
                if stops.signal or faults.past_deadline(time.perf_counter() - begun, step_times, save_s,
                                                        60 * cfg.max_minutes):
                    note = "" if saved == step else f"; checkpoint {save(run, step, parts, cfg, log)} saved"
                    why = stops.signal or f"max_minutes={cfg.max_minutes:g} (the next step would end past it)"
                    message = f"stopped at step {step}/{total} by {why}{note}; rerun the same command to resume"
                    if stops.signal:
                        raise Stopped(message, stops.code)
                    meter.notice(message)
                    break
                metrics, cfg = take_step(parts, cfg, train, step, log)
                step_times.append(metrics["time/step"])
                if planned:
                    metrics.update({"plan/generate": planned.breakdown.fixed + planned.breakdown.generation,
                                    "plan/train": planned.breakdown.fixed + planned.breakdown.training,
                                    "plan/device": planned.breakdown.peak})
                if cfg.eval_every and (step + 1) % cfg.eval_every == 0:  # one completion per prompt: as many
                    # prompts per generate call as a training batch prefills, so eval stays inside the plan
                    batch_size, began = budget.prefill_rows(cfg.gen_batch, cfg.group_size), time.perf_counter()
                    metrics.update({f"eval/{k}": v for k, v in evaluate.run_eval(
                        parts.model, parts.tokenizer, held_out, cfg, batch_size=batch_size).items()})
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


def load_parts(cfg: Config, planned, quiet: bool) -> Parts:
    """The policy (capped to the --vram budget on CUDA), its optimizer and loss scaler, and the memories."""
    model, tokenizer, device = policy.load_policy(
        cfg.model, quant=cfg.quant, dtype=cfg.dtype, device=cfg.device, lora_rank=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha, grad_checkpointing=cfg.grad_checkpointing, seed=cfg.seed)
    if planned and device.type == "cuda":  # hold the run to the budget, so "fits in 8G" holds on any larger card
        meter.cap_cuda_memory(budget.parse_bytes(cfg.vram), budget.CUDA_CONTEXT_BYTES, device)
        outside = meter.cuda_outside_torch(device)
        if outside > budget.CUDA_CONTEXT_BYTES and not quiet:
            print(f"note: {meter.human_bytes(outside)} of this GPU is in use outside torch (other processes?); "
                  f"--vram {cfg.vram} budgets this run only", flush=True)
    trainable = [p for p in model.parameters() if p.requires_grad]  # LoRA weights: fp32 whatever the compute dtype
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.weight_decay)
    fp16 = policy.causal_lm(model).dtype == torch.float16  # fp16 gradients underflow without a loss scale
    scaler = torch.amp.GradScaler(device.type) if fp16 else None
    enc, mem = memory_setup(cfg, device)  # Memory-R+: the sentence encoder and both episodic memories
    model.train()  # from_pretrained leaves eval mode, in which transformers skips gradient checkpointing
    return Parts(model, tokenizer, device, optimizer, scaler, enc, mem)


def take_step(parts: Parts, cfg: Config, train: list[Example], step: int, log) -> tuple[dict, Config]:
    """One optimizer step: sample, score, remember, advantages, GRPO update. Returns its metrics and the config
    (an out-of-memory back-off may have lowered gen_batch or micro_batch); leaves its sample rows on the meter."""
    timings: dict[str, float] = {}
    peaks: dict[str, int] = {}
    started = time.perf_counter()
    model, device = parts.model, parts.device
    batch = tasks.examples_for_step(train, step, cfg.prompts_per_step, cfg.seed)
    rendered = prompts.render(batch, parts.tokenizer, cfg.max_prompt_tokens, few_shot=cfg.few_shot,
                              seed=cfg.seed, system_prompt=evaluate.system_prompt(cfg.task))
    with meter.phase(timings, peaks, "generate", device):
        rollouts, cfg = with_oom_backoff(lambda c: policy.generate(
            model, parts.tokenizer, rendered, group_size=c.group_size, max_new_tokens=c.max_new_tokens,
            gen_batch=c.gen_batch, temperature=c.temperature, top_p=c.top_p,
            min_new_tokens=c.min_new_tokens), cfg, "gen_batch", log)
    with meter.phase(timings, peaks, "score", device):
        scored = score(cfg, rollouts)
    memory_stats = {}
    if parts.memory is not None:
        with meter.phase(timings, peaks, "memory", device):
            scored, memory_stats = remember(parts.encoder, parts.memory, rollouts, scored)
    adv = grpo.advantages(scored.total, cfg.group_size)  # [P*G]
    with meter.phase(timings, peaks, "train", device):
        lr = grpo.lr_at(step, log.total, cfg.lr, cfg.warmup_ratio)  # a function of the step: resume-safe
        for group in parts.optimizer.param_groups:
            group["lr"] = lr
        batch = grpo.train_batch(rollouts, adv)
        (loss, kl), cfg = with_oom_backoff(
            lambda c: accumulate(model, parts.optimizer, batch, c, device, parts.scaler), cfg, "micro_batch", log)
        result = update(parts.optimizer, parts.scaler, cfg.max_grad_norm, loss, kl)
    timings["step"] = time.perf_counter() - started
    if device.type == "cuda":  # what nvidia-smi shows for this run: the allocator's peak + the context
        peaks["device"] = peaks["reserved"] + meter.cuda_outside_torch(device)
    metrics = meter.step_metrics(step + 1, rollouts, scored, result, lr=lr, timings=timings, peaks=peaks)
    metrics.update({"amp/scale": parts.scaler.get_scale() if parts.scaler else 1.0,
                    "oom/backoffs": log.oom_backoffs, "oom/gen_batch": cfg.gen_batch,
                    "oom/micro_batch": cfg.micro_batch})
    if memory_stats:
        metrics.update(memory_stats, **{"time/memory_share": timings["memory"] / timings["step"]})
    log.pending_samples = meter.sample_rows(rollouts, scored, n=4)
    return metrics, cfg


def save(run: str, step: int, parts: Parts, cfg: Config, log) -> str:
    """Checkpoint `step` with the loop's own state: the OOM back-off's settings and count, and the loss scale."""
    state = {"oom": {"gen_batch": cfg.gen_batch, "micro_batch": cfg.micro_batch, "logprob_chunk": cfg.logprob_chunk,
                     "backoffs": log.oom_backoffs}}
    if parts.scaler:
        state["scaler"] = parts.scaler.state_dict()
    path = checkpoint.save(run, step, parts.model, parts.optimizer, state, parts.memory, keep=cfg.keep_checkpoints)
    return os.path.basename(path)


def restore(state: dict | None, cfg: Config, scaler) -> tuple[int, Config]:
    """After checkpoint.resume: the step to continue from and the config as the OOM back-off had left it (so the
    batches split as they would have); the loss scale put back. (0, cfg) for a fresh run."""
    if state is None:
        return 0, cfg
    if scaler and "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    knobs = {k: v for k, v in state.get("oom", {}).items() if k != "backoffs"}
    return state["step"], dataclasses.replace(cfg, **knobs)


def make_plan(cfg: Config, pins: frozenset[str], caps) -> budget.Plan:
    """The --vram plan: model geometry from config.json (no weights), prompt lengths from a sample of the task
    rendered with the model's tokenizer when one is at hand (else the prompt cap), the user's settings pinned."""
    name = "HuggingFaceTB/SmolLM2-135M-Instruct" if cfg.model in policy.ALIASES else cfg.model
    model_config = budget.load_model_config(name)
    policy.check_plain_logits(types.SimpleNamespace(**model_config), cfg.model)  # refused before any plan is shown
    geometry = budget.geometry_from_config(model_config, name=cfg.model)
    if not policy.prompt_sharing_available():  # this transformers scores every row with its own prompt
        geometry = dataclasses.replace(geometry, full_attention=False)
    lengths = [cfg.max_prompt_tokens]
    try:
        sample = tasks.load_task(cfg.task, cfg.data, "train", cfg.seed, 64)
        tokenizer = policy.load_tokenizer(policy.resolve_model(cfg.model))
        rendered = prompts.render(sample, tokenizer, cfg.max_prompt_tokens, few_shot=cfg.few_shot,
                                  seed=cfg.seed, system_prompt=evaluate.system_prompt(cfg.task))
        lengths = rendered.attention_mask.sum(-1).tolist()
    except (UserError, OSError, ValueError):
        pass  # no data or tokenizer offline: plan for full-length prompts, the safe side
    knobs = {k: getattr(cfg, k) for k in budget.KNOBS if k in pins}
    base = {k: getattr(cfg, k) for k in budget.GIVEN}
    encoder_bytes = budget.ENCODER_BYTES if cfg.method.startswith("memory") else 0
    return budget.plan(geometry, budget.parse_bytes(cfg.vram), lengths, caps, knobs, base=base,
                       encoder_bytes=encoder_bytes)


def score(cfg: Config, rollouts: Rollouts) -> Scored:
    """Task rewards for every completion (the toy task has its own), each component under its own name."""
    g = rollouts.group_size
    answers = [ex.answer for ex in rollouts.prompts.examples for _ in range(g)]  # [P*G]
    completions = list(rollouts.completions)
    if tasks.reward_kind(cfg.task) == "toy":
        components = {"digits": rewards.digit_fraction(completions)}
        correct = [False] * len(completions)
    else:
        components = rewards.task_rewards(completions, answers, cfg.method, numeric=cfg.numeric_match,
                                          max_len=cfg.cosine_max_len)
        correct = rewards.correct_flags(completions, answers, numeric=cfg.numeric_match)
    tensors = {k: torch.tensor(v, dtype=torch.float32) for k, v in components.items()}  # name -> [P*G]
    return Scored(components=tensors, correct=torch.tensor(correct, dtype=torch.bool))


def memory_setup(cfg: Config, device):
    """The encoder and an empty MemoryState for the memory methods; (None, None) otherwise."""
    if not cfg.method.startswith("memory"):
        return None, None
    enc = encoder.HashingEncoder() if cfg.encoder == "hashing" else encoder.Encoder(cfg.encoder, device=device.type)
    settings = memory.MemorySettings(
        dim=enc.dim, k=cfg.memory_k, max_keys=cfg.memory_max_keys, max_values=cfg.memory_max_values,
        window=cfg.memory_window, explore_warmup=cfg.explore_warmup, order=cfg.memory_order,
        exploit_weight=cfg.exploit_weight, explore_weight=cfg.explore_weight if cfg.method == "memory-r+" else 0.0)
    return enc, memory.MemoryState(settings.check())


def remember(enc, mem, rollouts: Rollouts, scored: Scored) -> tuple[Scored, dict]:
    """Memory-R+ for the whole step: one batched encode (questions + reasoning spans), one batched write/read.

    Each completion is stored and recalled under its own question. Adds the weighted exploit/explore rewards.
    """
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
    sizes = mem.stats()
    stats = {"memory/exploit_raw": float(out.exploit_raw.mean()), "memory/exploit": float(out.exploit.mean()),
             "memory/explore_raw": float(out.explore_raw.mean()), "memory/explore": float(out.explore.mean()),
             "memory/explore_share": float(np.mean(out.explore_on)), "time/memory_encode_ms": encode_ms,
             "time/memory_recall_ms": out.timing_ms["search"],
             "time/memory_total_ms": out.timing_ms["total"] + encode_ms,
             **{f"memory/{k}": v for k, v in sizes.items()}}
    return Scored(components=components, correct=scored.correct), stats


def with_oom_backoff(run, cfg: Config, knob: str, log):
    """Run `run(cfg)`; on out-of-memory halve `knob` (gen_batch or micro_batch) and run the same work again.

    Nothing is lost: a training retry (`accumulate`) starts from zeroed gradients and comes before the update, and
    the rollouts of the step are kept. The smaller value stays for the rest of the run. Returns (result, cfg).
    """
    while True:
        try:
            return run(cfg), cfg
        except torch.OutOfMemoryError:
            value = getattr(cfg, knob)
            hint = meter.allocator_hint()
            if value == 1:
                raise UserError(f"out of memory with {knob}=1; lower max_new_tokens or lora_rank, use quant=4bit, or "
                                f"plan with a smaller --vram{hint} (docs/memory.md: what to try on OOM)")
            smaller = dataclasses.replace(cfg, **{knob: value // 2})
            if knob == "micro_batch":
                smaller = dataclasses.replace(smaller, logprob_chunk=min(cfg.logprob_chunk, value // 2))
            log.echo(f"warning: out of memory; {knob} {value} -> {value // 2}, retrying the step{hint}")
            log.oom_backoffs += 1
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            cfg = smaller


def train_step(model, optimizer, batch: TrainBatch, cfg: Config, device, scaler=None) -> StepResult:
    """Loss and backward over micro-batches (gradient accumulation), then clip and step.

    Each micro-batch is trimmed to its own longest prompt and completion, so padding costs nothing. Log-probs are
    taken at the sampling temperature (score_at_temperature). With fp16 compute, `scaler` scales the loss before
    backward and unscales the gradients before clipping. A non-finite loss or gradient norm skips the optimizer
    step; the scaler then lowers its scale.
    """
    loss, kl = accumulate(model, optimizer, batch, cfg, device, scaler)
    return update(optimizer, scaler, cfg.max_grad_norm, loss, kl)


def accumulate(model, optimizer, batch: TrainBatch, cfg: Config, device, scaler=None) -> tuple[float, float]:
    """Zero the gradients, then forward and backward every micro-batch: (summed loss, mean KL per completion).
    What an out-of-memory retry repeats: nothing here touches the weights or the optimizer's state."""
    n = batch.input_ids.shape[0]
    total_loss, kls = 0.0, []
    temperature = cfg.temperature if cfg.score_at_temperature else 1.0
    # backward sets the peak: in fp32 on CPU, handing the forward's freed heap back first lowers peak RSS by
    # ~150 MB at no measured cost (in bf16 it lowered nothing; docs/memory.md)
    trim = device.type == "cpu" and policy.causal_lm(model).dtype == torch.float32
    optimizer.zero_grad(set_to_none=True)
    for s in range(0, n, cfg.micro_batch):
        ids, attn = batch.input_ids[s:s + cfg.micro_batch], batch.attention_mask[s:s + cfg.micro_batch]
        cmask = batch.completion_mask[s:s + cfg.micro_batch]  # [b, Tc]
        tc = int(cmask.sum(-1).max().item())
        tp = ids.shape[1] - cmask.shape[1]
        first = int(attn[:, :tp].sum(0).nonzero()[0].item()) if attn[:, :tp].any() else 0
        ids, attn = ids[:, first:tp + tc].to(device), attn[:, first:tp + tc].to(device)  # [b, T']
        cmask = cmask[:, :tc].to(device)  # [b, tc]
        adv = batch.advantages[s:s + cfg.micro_batch].to(device)  # [b]
        ref = (policy.reference_logprobs(model, ids, attn, tc, cfg.logprob_chunk, temperature=temperature)
               if cfg.kl_beta else None)
        logp = policy.completion_logprobs(model, ids, attn, tc, cfg.logprob_chunk, temperature=temperature)  # [b, tc]
        loss, kl = grpo.loss(logp, ref, adv, cmask, cfg.kl_beta, n)
        if trim:
            meter.release_freed()
        (scaler.scale(loss) if scaler else loss).backward()
        total_loss += loss.item()
        kls.append(kl.cpu())
    return total_loss, torch.cat(kls).mean().item()


def update(optimizer, scaler, max_grad_norm: float, loss: float, kl: float) -> StepResult:
    """Unscale (fp16), clip, and step unless the loss or the gradient norm is not finite."""
    if scaler:
        scaler.unscale_(optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
    finite = math.isfinite(loss) and math.isfinite(grad_norm)
    if finite:
        (scaler or optimizer).step(*([optimizer] if scaler else []))
    if scaler:
        scaler.update()  # halves the scale after inf/nan gradients, grows it after a run of good steps
    return StepResult(loss, kl, grad_norm, skipped=not finite)


def with_overrides(cfg: Config, **changes) -> Config:
    return config_mod.validate(dataclasses.replace(cfg, **changes))
