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
import json
import os
import random
import time
import types

import torch

import numpy as np

from tinyrl import budget, checkpoint, encoder, grpo, memory, meter, policy, prompts, rewards, tasks
from tinyrl import config as config_mod
from tinyrl.config import Config
from tinyrl.errors import UserError
from tinyrl.types import Example, Rollouts, Scored, TrainBatch


def fit(cfg: Config, quiet: bool = False, pins: frozenset[str] = frozenset()) -> str:
    """Train (or resume) the run in cfg.out; returns the run folder. `pins`: settings the user set by hand,
    which the --vram planner keeps."""
    checkpoint.check_writable(cfg.out)
    planned = None
    if cfg.vram:  # the planner picks every memory setting before any weight loads
        planned = make_plan(cfg, pins, budget.detect_caps(cfg.device))
        cfg = with_overrides(cfg, **planned.knobs())
        if not quiet:
            print(budget.format_plan(planned), flush=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    train = tasks.load_task(cfg.task, cfg.data, "train", cfg.seed, None)
    held_out = tasks.load_task(cfg.task, cfg.data, "test", cfg.seed, cfg.eval_limit) if cfg.eval_every else []
    total = cfg.steps or max(1, len(train) // cfg.prompts_per_step)

    random.seed(cfg.seed)
    model, tokenizer, device = policy.load_policy(
        cfg.model, quant=cfg.quant, dtype=cfg.dtype, device=cfg.device, lora_rank=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha, grad_checkpointing=cfg.grad_checkpointing, seed=cfg.seed)
    if planned and device.type == "cuda":  # hold the run to the budget, so "fits in 8G" holds on any larger card
        cap_cuda_memory(budget.parse_bytes(cfg.vram), budget.CUDA_CONTEXT_BYTES, device)
        outside = meter.cuda_outside_torch(device)
        if outside > budget.CUDA_CONTEXT_BYTES and not quiet:
            print(f"note: {meter.human_bytes(outside)} of this GPU is in use outside torch (other processes?); "
                  f"--vram {cfg.vram} budgets this run only", flush=True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, grpo.lr_factor(total, cfg.warmup_ratio))
    enc, mem = memory_setup(cfg, device)  # Memory-R+: the sentence encoder and both episodic memories
    run, resume_from = prepare_run(cfg)  # only now, so a bad task or model leaves no run folder behind

    start = 0
    torch.manual_seed(cfg.seed)
    if resume_from:
        start = checkpoint.load(resume_from, model, optimizer, scheduler, mem)["step"]
        for name in ("metrics.jsonl", "samples.jsonl"):
            meter.truncate_jsonl(os.path.join(run, name), start)
    log = meter.Meter(run, total, start, quiet=quiet)
    log.echo(f"{'resuming' if resume_from else 'starting'} {run}: {cfg.task} with {cfg.model}, method "
             f"{cfg.method}, step {start}/{total}, P={cfg.prompts_per_step} G={cfg.group_size} on {device}")
    model.train()
    try:
        for step in range(start, total):
            timings: dict[str, float] = {}
            peaks: dict[str, int] = {}
            started = time.perf_counter()
            batch = examples_for_step(train, step, cfg.prompts_per_step, cfg.seed)
            rendered = prompts.render(batch, tokenizer, cfg.max_prompt_tokens, few_shot=cfg.few_shot,
                                      seed=cfg.seed, system_prompt=system_prompt(cfg.task))
            with meter.phase(timings, peaks, "generate", device):
                rollouts, cfg = with_oom_backoff(lambda c: policy.generate(
                    model, tokenizer, rendered, group_size=c.group_size, max_new_tokens=c.max_new_tokens,
                    gen_batch=c.gen_batch, temperature=c.temperature, top_p=c.top_p,
                    min_new_tokens=c.min_new_tokens), cfg, "gen_batch", log)
            with meter.phase(timings, peaks, "score", device):
                scored = score(cfg, rollouts)
            memory_stats = {}
            if mem is not None:
                with meter.phase(timings, peaks, "memory", device):
                    scored, memory_stats = remember(enc, mem, rollouts, scored)
            adv = grpo.advantages(scored.total, cfg.group_size)  # [P*G]
            with meter.phase(timings, peaks, "train", device):
                lr = scheduler.get_last_lr()[0]
                batch = grpo.train_batch(rollouts, adv)
                (loss, kl, grad_norm), cfg = with_oom_backoff(
                    lambda c: train_step(model, optimizer, batch, c, device), cfg, "micro_batch", log)
                scheduler.step()
            timings["step"] = time.perf_counter() - started
            if device.type == "cuda":  # what nvidia-smi shows for this run: the allocator's peak + the context
                peaks["device"] = peaks["reserved"] + meter.cuda_outside_torch(device)
            metrics = step_metrics(step + 1, rollouts, scored, cfg, loss=loss, kl=kl, grad_norm=grad_norm,
                                   lr=lr, timings=timings, peaks=peaks)
            metrics.update({"oom/backoffs": log.oom_backoffs, "oom/gen_batch": cfg.gen_batch,
                            "oom/micro_batch": cfg.micro_batch})
            if planned:
                metrics.update({"plan/generate": planned.breakdown.fixed + planned.breakdown.generation,
                                "plan/train": planned.breakdown.fixed + planned.breakdown.training,
                                "plan/device": planned.breakdown.peak})
            if memory_stats:
                metrics.update(memory_stats, **{"time/memory_share": timings["memory"] / timings["step"]})
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0:  # one completion per prompt: as many
                # prompts per generate call as a training batch prefills, so eval stays inside the plan
                batch_size = budget.prefill_rows(cfg.gen_batch, cfg.group_size)
                metrics.update({f"eval/{k}": v for k, v in run_eval(model, tokenizer, held_out, cfg,
                                                                     batch_size=batch_size).items()})
            log.log(metrics)
            if (step + 1) % cfg.sample_every == 0 or step == start:
                log.samples(step + 1, sample_rows(rollouts, scored, n=4))
            if (step + 1) % cfg.save_every == 0 or step + 1 == total:
                checkpoint.save(run, step + 1, model, optimizer, scheduler, {"total": total}, mem)
    finally:
        log.close()
    log.echo(meter.report(run))
    return run


def prepare_run(cfg: Config) -> tuple[str, str | None]:
    """Create the run folder and save the config; returns (run, checkpoint to resume from or None).

    A folder whose saved config equals cfg and that holds a checkpoint is resumed (rerunning the same command
    continues it); a different config in an existing run folder is an error, so no run is overwritten by accident.
    """
    run = cfg.out
    os.makedirs(run, exist_ok=True)
    saved_path = os.path.join(run, "config.json")
    resume_from = checkpoint.latest(run)
    if os.path.exists(saved_path):
        saved = config_mod.load(saved_path)
        if saved != cfg:
            diff = [f"{k}={getattr(saved, k)!r}" for k in config_mod.FIELDS if getattr(saved, k) != getattr(cfg, k)]
            raise UserError(f"{run} holds a run with other settings ({', '.join(diff[:4])}); pass --resume to "
                            "continue it with its saved settings, or choose another --out")
    elif resume_from:
        raise UserError(f"{run} has checkpoints but no config.json; choose another --out")
    config_mod.save(cfg, saved_path)
    if not resume_from:
        for name in ("metrics.jsonl", "samples.jsonl"):  # a run that died before its first checkpoint
            if os.path.exists(os.path.join(run, name)):
                os.unlink(os.path.join(run, name))
    return run, resume_from


def system_prompt(task: str) -> str:
    return prompts.TOY_SYSTEM_PROMPT if tasks.reward_kind(task) == "toy" else prompts.SYSTEM_PROMPT


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
                                  seed=cfg.seed, system_prompt=system_prompt(cfg.task))
        lengths = rendered.attention_mask.sum(-1).tolist()
    except (UserError, OSError, ValueError):
        pass  # no data or tokenizer offline: plan for full-length prompts, the safe side
    knobs = {k: getattr(cfg, k) for k in budget.KNOBS if k in pins}
    base = {k: getattr(cfg, k) for k in budget.GIVEN}
    encoder_bytes = budget.ENCODER_BYTES if cfg.method.startswith("memory") else 0
    return budget.plan(geometry, budget.parse_bytes(cfg.vram), lengths, caps, knobs, base=base,
                       encoder_bytes=encoder_bytes)


def cap_cuda_memory(vram_bytes: int, context: int, device) -> None:
    """Cap torch's allocator so that it plus what lives outside it (the CUDA context) stays within vram_bytes:
    on a bigger card the run then backs off or fails where the smaller card would. Near the cap the allocator
    returns cached blocks to the driver before it fails, which costs speed, not correctness."""
    index = torch.cuda.current_device() if device.index is None else device.index  # torch wants an index here
    total = torch.cuda.get_device_properties(index).total_memory
    torch.cuda.set_per_process_memory_fraction(max(0.0, min(1.0, (vram_bytes - context) / total)), index)


def examples_for_step(data: list[Example], step: int, per_step: int, seed: int) -> list[Example]:
    """The P examples of a step: a fresh seeded shuffle each epoch, so the data position is just the step."""
    orders: dict[int, list[int]] = {}  # epoch -> its permutation (a step spans at most two epochs)
    out = []
    for i in range(step * per_step, (step + 1) * per_step):
        epoch, pos = divmod(i, len(data))
        if epoch not in orders:
            orders[epoch] = list(range(len(data)))
            random.Random(seed * 1_000_003 + epoch).shuffle(orders[epoch])
        out.append(data[orders[epoch][pos]])
    return out


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

    Nothing is lost: a training retry starts from zeroed gradients before any optimizer step, and the rollouts
    of the step are kept. The smaller value stays for the rest of the run. Returns (result, cfg).
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


def train_step(model, optimizer, batch: TrainBatch, cfg: Config, device) -> tuple[float, float, float]:
    """Loss and backward over micro-batches (gradient accumulation), then clip and step.

    Each micro-batch is trimmed to its own longest prompt and completion, so padding costs nothing.
    Returns (loss, mean KL per completion, grad norm before clipping).
    """
    n = batch.input_ids.shape[0]
    total_loss, kls = 0.0, []
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
        ref = policy.reference_logprobs(model, ids, attn, tc, cfg.logprob_chunk) if cfg.kl_beta else None
        logp = policy.completion_logprobs(model, ids, attn, tc, cfg.logprob_chunk)  # [b, tc]
        loss, kl = grpo.loss(logp, ref, adv, cmask, cfg.kl_beta, n)
        if trim:
            meter.release_freed()
        loss.backward()
        total_loss += loss.item()
        kls.append(kl.cpu())
    params = [p for g in optimizer.param_groups for p in g["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    optimizer.step()
    return total_loss, torch.cat(kls).mean().item(), float(grad_norm)


def step_metrics(step: int, rollouts: Rollouts, scored: Scored, cfg: Config, *, loss: float, kl: float,
                 grad_norm: float, lr: float, timings: dict, peaks: dict) -> dict:
    """Every key is defined in docs/metrics.md."""
    lengths = rollouts.completion_mask.sum(-1)  # [P*G] tokens incl. EOS
    grouped = scored.total.view(-1, rollouts.group_size)  # [P, G]
    metrics = {"step": step, "reward/total": scored.total.mean().item()}
    metrics.update({f"reward/{k}": v.mean().item() for k, v in scored.components.items()})
    metrics.update({
        "correct": scored.correct.float().mean().item(),
        "len/mean": lengths.mean().item(), "len/min": lengths.min().item(), "len/max": lengths.max().item(),
        "len/frac_at_cap": rollouts.truncated.float().mean().item(),
        "len/frac_short": (lengths < 16).float().mean().item(),
        "groups/frac_zero_var": (grouped.std(-1) < 1e-6).float().mean().item(),
        "loss": loss, "kl": kl, "grad_norm": grad_norm, "lr": lr,
    })
    metrics.update({f"time/{k}": round(v, 4) for k, v in timings.items()})
    metrics.update({f"mem/{k}": v for k, v in peaks.items()})
    return metrics


def sample_rows(rollouts: Rollouts, scored: Scored, n: int) -> list[dict]:
    rows = []
    for i in range(min(n, len(rollouts.completions))):
        ex = rollouts.prompts.examples[i // rollouts.group_size]
        rows.append({"question": ex.question, "answer": ex.answer, "completion": rollouts.completions[i],
                     "reward": round(scored.total[i].item(), 4),
                     **{k: round(v[i].item(), 4) for k, v in scored.components.items()}})
    return rows


# --- evaluation ---------------------------------------------------------------------------------


def evaluate(cfg: Config, adapter: str | None, limit: int | None, out_path: str | None) -> dict:
    """`tinyrl eval`: greedy completions on the test split; exact match on <answer> and extractive match."""
    examples = tasks.load_task(cfg.task, cfg.data, "test", cfg.seed, limit)
    model, tokenizer, _ = policy.load_policy(
        cfg.model, quant=cfg.quant, dtype=cfg.dtype, device=cfg.device, lora_rank=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha, grad_checkpointing=False, seed=cfg.seed, adapter=adapter)
    return run_eval(model, tokenizer, examples, cfg, out_path, progress=True)


def run_eval(model, tokenizer, examples: list[Example], cfg: Config, out_path: str | None = None,
             progress: bool = False, batch_size: int | None = None) -> dict:
    """Greedy completions, `batch_size` prompts per generate call (default gen_batch), and both metrics."""
    rows = []
    batch_size = batch_size or cfg.gen_batch
    for s in range(0, len(examples), batch_size):
        batch = examples[s:s + batch_size]
        rendered = prompts.render(batch, tokenizer, cfg.max_prompt_tokens, few_shot=cfg.few_shot, seed=cfg.seed,
                                  system_prompt=system_prompt(cfg.task))
        out = policy.generate(model, tokenizer, rendered, group_size=1, max_new_tokens=cfg.max_new_tokens,
                              gen_batch=batch_size, greedy=True)
        answers = [ex.answer for ex in batch]
        exact = rewards.correctness(list(out.completions), answers)
        extractive = rewards.extractive_match(list(out.completions), answers)
        for ex, text, e, x in zip(batch, out.completions, exact, extractive):
            rows.append({"index": ex.index, "question": ex.question, "answer": ex.answer, "completion": text,
                         "exact_match": e, "extractive_match": x})
        if progress:
            print(f"eval {len(rows)}/{len(examples)} exact {mean(r['exact_match'] for r in rows):.3f} "
                  f"extractive {mean(r['extractive_match'] for r in rows):.3f}", flush=True)
    if out_path:
        config_mod.write_atomic(out_path, "".join(json.dumps(r) + "\n" for r in rows))
    return {"exact_match": mean(r["exact_match"] for r in rows),
            "extractive_match": mean(r["extractive_match"] for r in rows), "n": len(rows)}


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def with_overrides(cfg: Config, **changes) -> Config:
    return config_mod.validate(dataclasses.replace(cfg, **changes))
