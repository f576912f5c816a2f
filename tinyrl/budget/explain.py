"""The plan in words: why each knob has its value, the byte table as text, and the one line when nothing fits.

Owns `_reasons` (knob, value, why), `format_plan` (what `tinyrl plan` and `fit --vram` print) and
`_no_fit_message`. It prices the alternatives it names with phases.estimate and reads the starting values and
limits from budget.knobs; it does not search (budget.search calls it, and hands it the numbers of a failed search).
Imports budget.knobs, budget.phases and budget.units.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any, Callable, Mapping

from tinyrl.budget.knobs import (
    DEFAULT_LORA_RANK,
    LOGPROB_CHUNK_MAX,
    MARGIN,
    MIN_LORA_RANK,
    MIN_NEW_TOKENS,
    PAPER,
    TOKENS_PER_MICRO,
    Settings,
    _gen_candidates,
    _halvings,
    _pow2_floor,
)
from tinyrl.budget.phases import Breakdown, estimate
from tinyrl.budget.units import MiB, format_bytes

if TYPE_CHECKING:
    from tinyrl.budget.device import DeviceCaps
    from tinyrl.budget.geometry import ModelGeometry
    from tinyrl.budget.search import Plan


def _reasons(g: ModelGeometry, s: Settings, bd: Breakdown, tp: int, lengths: list[int], caps: DeviceCaps,
             pins: Mapping[str, Any], start: Mapping[str, Any], stage: str, budget: int,
             encoder_bytes: int) -> tuple[tuple[str, Any, str], ...]:
    """(knob, value, why) for every knob, in the planner's order."""
    def alt(**change) -> int:  # the peak with some knobs changed
        return estimate(g, replace(s, **change), tp, caps, encoder_bytes, top_p=start.get("top_p", 1.0),
                        reference=start.get("kl_beta", 0.04) != 0).peak

    texts = {
        "group_size": f"paper value (G={PAPER['group_size']}); its completions share one prompt prefill",
        "prompts_per_step": "paper value; generation and training loop over P·G, so memory does not depend on it",
        "max_prompt_tokens": f"paper value; sampled prompts need up to {max(lengths) if lengths else '?'} tokens, "
                             f"so Tp={tp}",
        "dtype": _dtype_why(s, caps),
        "quant": _quant_why(s, caps, budget, alt),
        "grad_checkpointing": _checkpointing_why(s, budget, alt),
        "lora_rank": _rank_why(s, start),
        "gen_batch": _gen_batch_why(s, bd, alt),
        "micro_batch": _micro_batch_why(s, tp, caps, alt),
        "logprob_chunk": f"each [1, Tc, V] row with grads is "
                         f"{format_bytes(bd.term('log-prob chunk (with grads)').bytes // s.logprob_chunk)}; the most "
                         f"rows (<= micro_batch, <= {LOGPROB_CHUNK_MAX}) that do not raise the peak",
        "max_new_tokens": _new_tokens_why(s, start),
    }
    out = [(name, getattr(s, name), "pinned" if name in pins else text) for name, text in texts.items()]
    if stage == "small batches" and "gen_batch" not in pins:
        out.append(("note", "", "even 4-bit with checkpointing leaves room only for small batches; slow but fits"))
    return tuple(out)


def _dtype_why(s: Settings, caps: DeviceCaps) -> str:
    if caps.bf16:
        return f"{caps.name} supports bf16"
    if s.dtype == "fp16":
        return (f"{caps.name} has no bf16: fp16 compute, fp32 LoRA weights, dynamic loss scaling (a step "
                "whose gradients overflow is skipped: amp/skipped)")
    return f"{caps.name} has neither bf16 nor usable fp16"


def _quant_why(s: Settings, caps: DeviceCaps, budget: int, alt: Callable[..., int]) -> str:
    if s.quant == "none":
        return "16-bit weights fit: the paper's numerics, no quantisation error"
    need = alt(quant="none")
    return (f"16-bit weights would need {format_bytes(need)} with these batches (budget "
            f"{format_bytes(budget)})" if caps.cuda else "4-bit")


def _checkpointing_why(s: Settings, budget: int, alt: Callable[..., int]) -> str:
    if s.grad_checkpointing:
        off = alt(grad_checkpointing=False)
        return f"without it the peak would be {format_bytes(off)} (budget {format_bytes(budget)})"
    return "all activations of a micro-batch fit; saves ~1/3 of the training compute"


def _rank_why(s: Settings, start: Mapping[str, Any]) -> str:
    if s.lora_rank == start["lora_rank"]:
        return "default rank" if start["lora_rank"] == DEFAULT_LORA_RANK else "requested rank"
    return (f"lowered from {start['lora_rank']} to keep the settings above (RL updates carry little "
            "information; low ranks lose little)")


def _gen_batch_why(s: Settings, bd: Breakdown, alt: Callable[..., int]) -> str:
    n_seq = s.prompts_per_step * s.group_size
    kv = bd.term("KV cache").bytes
    gen_why = f"{s.gen_batch} of {n_seq} sequences in flight: KV cache {format_bytes(kv)}"
    if s.gen_batch < n_seq:
        bigger = next(x for x in reversed(_gen_candidates(n_seq)) if x > s.gen_batch)
        gen_why += f"; {bigger} would need {format_bytes(alt(gen_batch=bigger))}"
    return gen_why


def _micro_batch_why(s: Settings, tp: int, caps: DeviceCaps, alt: Callable[..., int]) -> str:
    n_seq = s.prompts_per_step * s.group_size
    t = tp + s.max_new_tokens
    target = min(n_seq, _pow2_floor(max(1, TOKENS_PER_MICRO // t)))
    if caps.cuda and s.micro_batch >= target:
        micro_why = (f"{s.micro_batch}·{t} tokens per forward: the most that fit (on a GPU a micro-batch costs its "
                     "kernel launches whatever its size)")
        if s.micro_batch < n_seq:
            bigger = next(x for x in reversed(_halvings(n_seq, 1)) if x > s.micro_batch)
            micro_why += f"; {bigger} would need {format_bytes(alt(micro_batch=bigger))}"
        return micro_why
    if s.micro_batch >= target:
        return f"{s.micro_batch}·{t} tokens per forward (~{TOKENS_PER_MICRO} tokens; more buys little speed)"
    return f"{2 * s.micro_batch} would need {format_bytes(alt(micro_batch=2 * s.micro_batch))}"


def _new_tokens_why(s: Settings, start: Mapping[str, Any]) -> str:
    if s.max_new_tokens < start["max_new_tokens"]:
        return (f"shortened from {start['max_new_tokens']}: the last resort, nothing else fits "
                f"(never below {MIN_NEW_TOKENS})")
    return "paper value" if start["max_new_tokens"] == PAPER["max_new_tokens"] else "task value"


def _no_fit_message(model: str, vram_bytes: int, device: str, pins: Mapping[str, Any], need: int,
                    free: Plan | None = None, bare: int | None = None) -> str:
    """The one line when no plan fits: `need`, what the pins (or the cheapest plan) need; with pins, `free` is the
    plan without them (None where none fits) and `bare` what the cheapest plan without them needs."""
    have = format_bytes(vram_bytes)
    if pins:
        pinned = ", ".join(f"{k}={v}" for k, v in sorted(pins.items()))
        head = f"{model} with {pinned} does not fit in {have}: that needs at least {format_bytes(need)}"
        if free is not None:
            changed = ", ".join(f"{k}={getattr(free, k)}" for k in sorted(pins) if getattr(free, k) != pins[k])
            return f"{head}; unpinned, {have} fits " + (f"with {changed}" if changed else "(see tinyrl plan)")
        return f"{head}; even unpinned it needs {format_bytes(bare)}"
    return (f"{model} does not fit in {have} on {device}: the smallest plan (4-bit, checkpointing, rank "
            f"{MIN_LORA_RANK}, 1 sequence at a time, {MIN_NEW_TOKENS} new tokens) needs {format_bytes(need)}")


def format_plan(plan_: Plan) -> str:
    """The byte table and the chosen settings as plain text (fixed-width columns, fine inside rich)."""
    bd = plan_.breakdown
    width = max(len(t.name) for t in bd.terms) + 2
    lines = [f"{plan_.model} on {plan_.device}: --vram {format_bytes(plan_.vram_bytes)}, planned within "
             f"{format_bytes(plan_.budget_bytes)} ({MARGIN:.0%} margin), Tp={plan_.prompt_len}, "
             f"Tc={plan_.max_new_tokens}", "",
             f"{'phase':<11}{'term':<{width}}{'MiB':>10}  formula"]
    totals = {"fixed": bd.fixed, "generation": bd.generation, "training": bd.training, "overhead": bd.overhead}
    rules = {"generation": bd.generation_rule, "training": bd.training_rule, "fixed": "sum", "overhead": "sum"}
    for phase in ("fixed", "generation", "training", "overhead"):
        for t in (t for t in bd.terms if t.phase == phase):
            lines.append(f"{phase:<11}{t.name:<{width}}{t.bytes / MiB:>10.1f}  {t.formula}")
        lines.append(f"{'':<11}{'= ' + phase:<{width}}{totals[phase] / MiB:>10.1f}  {rules[phase]}")
        lines.append("")
    lines.append(f"peak ({bd.peak_phase}) = fixed + max(generation, training) + overhead = {format_bytes(bd.peak)} "
                 f"of {format_bytes(plan_.budget_bytes)} ({bd.peak / plan_.budget_bytes:.0%})")
    lines += ["", f"{'setting':<20}{'value':>7}  why"]
    for name, value, text in plan_.reasons:
        shown = {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value
        lines.append(f"{name:<20}{str(shown):>7}  {text}")
    return "\n".join(lines)
