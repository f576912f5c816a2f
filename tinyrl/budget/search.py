"""The plan search: choose every knob so a run fits the budget, in the order docs/memory.md lists for an
out-of-memory error.

Owns Plan, `plan` (the search, step by step: `_preferred`, `_small_batches`, `_shortened`, then `_raise_rank`,
`_widen_micro_batch`, `_logprob_chunk`), `plan_for` (the plan of a run's Config), `minimum_bytes` and the pin checks.
Every candidate is priced by phases.estimate; the words come from budget.explain. Imports every other part of the
planner; none imports it (explain names Plan for type checkers only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Mapping

from tinyrl.budget.device import DEVICES, DeviceCaps
from tinyrl.budget.explain import _no_fit_message, _reasons
from tinyrl.budget.geometry import ModelGeometry
from tinyrl.budget.knobs import (
    DEFAULT_LORA_RANK,
    DTYPES,
    GIVEN,
    KNOBS,
    LOGPROB_CHUNK_MAX,
    MARGIN,
    MIN_GROUP_SIZE,
    MIN_LORA_RANK,
    MIN_NEW_TOKENS,
    NEW_TOKENS_STEP,
    PAPER,
    QUANTS,
    TOKENS_PER_MICRO,
    Settings,
    _gen_candidates,
    _halvings,
    _pow2_floor,
)
from tinyrl.budget.phases import Breakdown, estimate
from tinyrl.budget.terms import ENCODER_BYTES
from tinyrl.budget.units import parse_bytes
from tinyrl.errors import UserError


@dataclass(frozen=True)
class Plan:
    """The chosen knobs, the byte table behind them, and why each knob has its value."""

    model: str
    device: str
    vram_bytes: int  # what --vram said
    budget_bytes: int  # what the plan must fit in: min(--vram, the device's total) less the margin
    prompt_len: int  # Tp: the longest sampled prompt, capped at max_prompt_tokens
    group_size: int
    prompts_per_step: int
    gen_batch: int
    micro_batch: int
    logprob_chunk: int
    lora_rank: int
    quant: str
    dtype: str
    grad_checkpointing: bool
    max_prompt_tokens: int
    max_new_tokens: int
    breakdown: Breakdown
    reasons: tuple[tuple[str, Any, str], ...]  # (knob, value, why)

    def settings(self) -> Settings:
        return Settings(**self.knobs())

    def knobs(self) -> dict[str, Any]:
        """The knob values by Config field name."""
        return {name: getattr(self, name) for name in KNOBS}

    def metrics(self) -> dict[str, int]:
        """The planned peaks fit logs every step next to the measured ones (docs/metrics.md, plan/*)."""
        bd = self.breakdown
        return {"plan/generate": bd.fixed + bd.generation, "plan/train": bd.fixed + bd.training,
                "plan/device": bd.peak}


def plan_for(cfg, geometry: ModelGeometry, prompt_lengths: Iterable[int], caps: DeviceCaps,
             pins: frozenset[str]) -> Plan:
    """The plan for a run's Config under its --vram: the knobs in `pins` (set by hand) kept, the settings the
    planner does not choose (GIVEN) taken as they are, the sentence encoder counted for the memory methods."""
    return plan(geometry, parse_bytes(cfg.vram), prompt_lengths, caps, {k: getattr(cfg, k) for k in KNOBS if k in pins},
                base={k: getattr(cfg, k) for k in GIVEN},
                encoder_bytes=ENCODER_BYTES if cfg.method.startswith("memory") else 0)


# Structural levels, most preferred first: 16-bit keeps the paper's numerics (no quantisation error in policy
# or reference) and is at least as fast; checkpointing changes no numbers, it only costs ~1/3 more training
# compute, so it is given up before 16-bit is. Within a level the LoRA rank goes down first.
LEVELS: tuple[tuple[str, bool], ...] = (("none", False), ("none", True), ("4bit", False), ("4bit", True))


def plan(
    geometry: ModelGeometry,
    vram_bytes: int,
    prompt_lengths: Iterable[int],
    caps: DeviceCaps = DEVICES["cuda"],
    pins: Mapping[str, Any] | None = None,
    *,
    base: Mapping[str, Any] | None = None,
    encoder_bytes: int = ENCODER_BYTES,
) -> Plan:
    """Choose every knob so the run fits in `vram_bytes` on `caps`.

    `pins` are values the user set: kept as they are, or a one-line UserError says what would fit. `base`
    overrides the paper's starting values (PAPER) for other tasks, e.g. AI-MO's 512/300 tokens and 64 prompts.
    Order (the "what to try on OOM" list in docs/memory.md follows it):
      1. group_size, prompts_per_step, lengths: the paper's values (G never below 4; memory does not depend on
         P, generation and training loop over P*G; a larger G only shares one prefill among more rows);
      2. dtype: bf16 where supported, else fp16 on a GPU, fp32 on a CPU;
      3. for each level of LEVELS (16-bit without, then with checkpointing; 4-bit without, then with), for
         rank 16, 8, 4: accept the first where the micro-batch target (~4k tokens) and at least G sequences in
         flight fit; gen_batch is then the most that fits (up to P*G);
      4. otherwise the cheapest level and rank with smaller micro-batch and gen_batch (down to 1);
      5. otherwise, the last resort, shorter completions (down to MIN_NEW_TOKENS) with micro_batch 1;
      6. the rank is raised back up wherever that costs nothing;
      7. logprob_chunk: the most rows (<= micro_batch, <= LOGPROB_CHUNK_MAX) that do not raise the peak;
      8. before 7, on CUDA: micro_batch grown to the most that fits (each micro-batch costs kernel launches).
    """
    pins = _check_pins(dict(pins or {}), caps)
    x = _search(geometry, vram_bytes, prompt_lengths, caps, pins, base, encoder_bytes)
    choice = _preferred(x) or _small_batches(x) or _shortened(x)  # 3, 4, 5
    if choice is None:
        raise UserError(_no_fit(geometry, vram_bytes, x.lengths, caps, pins, base, encoder_bytes))
    c = _widen_micro_batch(x, _raise_rank(x, choice))  # 6, 8
    final = x.settings(c.quant, c.ckpt, c.rank, c.bg, c.b, c.tc, _logprob_chunk(x, c))  # 7
    breakdown = estimate(geometry, final, x.tp, caps, encoder_bytes, top_p=x.top_p, reference=x.reference)
    reasons = _reasons(geometry, final, breakdown, x.tp, x.lengths, caps, pins, x.start, c.stage, x.budget,
                       encoder_bytes)
    return Plan(model=geometry.name, device=caps.name, vram_bytes=vram_bytes, budget_bytes=x.budget, prompt_len=x.tp,
                **{name: getattr(final, name) for name in KNOBS}, breakdown=breakdown, reasons=reasons)


@dataclass(frozen=True)
class _Search:
    """What every candidate of one search shares, and how to price one."""

    geometry: ModelGeometry
    caps: DeviceCaps
    pins: Mapping[str, Any]  # knobs set by hand: kept as they are
    start: Mapping[str, Any]  # the values the search starts from: the paper's, the task's (base), the pins
    lengths: list[int]  # the sampled prompt lengths
    tp: int  # Tp: the longest sampled prompt, capped at max_prompt_tokens
    dtype: str
    budget: int  # bytes the plan must fit in
    encoder_bytes: int
    levels: tuple[tuple[str, bool], ...]  # (quant, checkpointing) the pins allow, most preferred first
    ranks: tuple[int, ...]  # LoRA ranks to try, highest first
    gen_cands: tuple[int, ...]  # gen_batch candidates, largest first
    gen_floor: int  # the fewest sequences in flight a preferred level must allow
    micro_floor: int  # a pinned chunk needs at least that many rows per micro-batch

    @property
    def n_seq(self) -> int:  # P·G
        return self.start["group_size"] * self.start["prompts_per_step"]

    @property
    def tc0(self) -> int:  # the completion length asked for
        return self.start["max_new_tokens"]

    @property
    def top_p(self) -> float:
        return self.start.get("top_p", 1.0)

    @property
    def reference(self) -> bool:  # beta 0: no reference pass
        return self.start.get("kl_beta", 0.04) != 0

    def settings(self, quant: str, ckpt: bool, rank: int, bg: int, b: int, tc: int, chunk: int = 1) -> Settings:
        pins, start = self.pins, self.start
        return Settings(group_size=start["group_size"], prompts_per_step=start["prompts_per_step"],
                        gen_batch=pins.get("gen_batch", bg), micro_batch=pins.get("micro_batch", b),
                        logprob_chunk=pins.get("logprob_chunk", min(chunk, pins.get("micro_batch", b))),
                        lora_rank=rank, quant=quant, dtype=self.dtype, grad_checkpointing=ckpt,
                        max_prompt_tokens=start["max_prompt_tokens"], max_new_tokens=tc)

    def peak(self, s: Settings) -> int:
        return estimate(self.geometry, s, self.tp, self.caps, self.encoder_bytes, top_p=self.top_p,
                        reference=self.reference).peak

    def fits(self, s: Settings) -> bool:
        return self.peak(s) <= self.budget

    def most(self, candidates: Iterable[int], make: Callable[[int], Settings]) -> int | None:
        """The largest candidate whose settings fit."""
        return next((x for x in candidates if self.fits(make(x))), None)

    def micro_target(self, tc: int) -> int:
        if "micro_batch" in self.pins:
            return self.pins["micro_batch"]
        return max(self.micro_floor, min(self.n_seq, _pow2_floor(max(1, TOKENS_PER_MICRO // (self.tp + tc)))))


def _search(geometry: ModelGeometry, vram_bytes: int, prompt_lengths: Iterable[int], caps: DeviceCaps,
            pins: Mapping[str, Any], base: Mapping[str, Any] | None, encoder_bytes: int) -> _Search:
    start = _start(pins, base)
    lengths = [int(x) for x in prompt_lengths]
    n_seq = start["group_size"] * start["prompts_per_step"]
    levels = [lv for lv in LEVELS if (caps.cuda or lv[0] == "none")
              and pins.get("quant", lv[0]) == lv[0] and pins.get("grad_checkpointing", lv[1]) == lv[1]]
    if not levels:  # 4-bit pinned on a CPU
        levels = [(pins["quant"], pins.get("grad_checkpointing", True))]
    ranks = [pins["lora_rank"]] if "lora_rank" in pins else _halvings(start["lora_rank"], MIN_LORA_RANK)
    gen_cands = [pins["gen_batch"]] if "gen_batch" in pins else _gen_candidates(n_seq)
    gen_floor = min(start["group_size"], n_seq) if "gen_batch" not in pins else pins["gen_batch"]
    return _Search(geometry, caps, pins, start, lengths, _prompt_tokens(lengths, start), _dtype(pins, caps),
                   _budget(vram_bytes, caps), encoder_bytes, tuple(levels), tuple(ranks), tuple(gen_cands),
                   gen_floor, micro_floor=pins.get("logprob_chunk", 1))


@dataclass(frozen=True)
class _Choice:
    """The knobs a search step found, and which step found them."""

    quant: str
    ckpt: bool
    rank: int
    bg: int  # gen_batch
    b: int  # micro_batch
    tc: int  # max_new_tokens
    stage: str  # "preferred", "small batches" or "shortened"


def _preferred(x: _Search) -> _Choice | None:
    """3. The first level and rank where the micro-batch target and at least G sequences in flight fit; gen_batch
    is then the most that fits."""
    m_target = x.micro_target(x.tc0)
    for quant, ckpt in x.levels:
        for rank in x.ranks:
            if not x.fits(x.settings(quant, ckpt, rank, 1, m_target, x.tc0)):
                continue
            bg = x.most(x.gen_cands, lambda v: x.settings(quant, ckpt, rank, v, 1, x.tc0))
            if bg is not None and bg >= x.gen_floor:
                return _Choice(quant, ckpt, rank, bg, m_target, x.tc0, "preferred")
    return None


def _small_batches(x: _Search) -> _Choice | None:
    """4. The cheapest level and rank, with smaller micro-batch and gen_batch (down to 1)."""
    (quant, ckpt), rank, tc = x.levels[-1], x.ranks[-1], x.tc0
    b = x.most(_halvings(x.micro_target(tc), x.micro_floor), lambda v: x.settings(quant, ckpt, rank, 1, v, tc))
    bg = x.most(x.gen_cands, lambda v: x.settings(quant, ckpt, rank, v, 1, tc))
    if b is not None and bg is not None:
        return _Choice(quant, ckpt, rank, bg, b, tc, "small batches")
    return None


def _shortened(x: _Search) -> _Choice | None:
    """5. The last resort: shorter completions (down to MIN_NEW_TOKENS), at the cheapest level and rank."""
    if "max_new_tokens" in x.pins:
        return None
    (quant, ckpt), rank = x.levels[-1], x.ranks[-1]
    b = x.pins.get("micro_batch", x.micro_floor)
    for tc in range(x.tc0 - NEW_TOKENS_STEP, MIN_NEW_TOKENS - 1, -NEW_TOKENS_STEP):
        if x.fits(x.settings(quant, ckpt, rank, 1, b, tc)):
            bg = x.most(x.gen_cands, lambda v: x.settings(quant, ckpt, rank, v, b, tc))
            if bg is not None:
                return _Choice(quant, ckpt, rank, bg, b, tc, "shortened")
    return None


def _raise_rank(x: _Search, c: _Choice) -> _Choice:
    """6. The rank back up where it is free."""
    return replace(c, rank=next(r for r in x.ranks if r >= c.rank
                                and x.fits(x.settings(c.quant, c.ckpt, r, c.bg, c.b, c.tc))))


def _widen_micro_batch(x: _Search, c: _Choice) -> _Choice:
    """8 (before 7, which depends on it). On CUDA, the largest micro-batch the budget allows: a GPU micro-batch
    costs its kernel launches whatever its rows, so fewer, larger ones are faster; a CPU gains nothing past ~4k
    tokens."""
    if not x.caps.cuda or "micro_batch" in x.pins or c.stage != "preferred":
        return c
    return replace(c, b=next((v for v in _halvings(x.n_seq, c.b + 1)
                              if x.fits(x.settings(c.quant, c.ckpt, c.rank, c.bg, v, c.tc))), c.b))


def _logprob_chunk(x: _Search, c: _Choice) -> int:
    """7. The most log-prob rows (<= micro_batch, <= LOGPROB_CHUNK_MAX) that do not raise the peak."""
    if "logprob_chunk" in x.pins:
        return 1  # the pin wins in x.settings
    base_peak = x.peak(x.settings(c.quant, c.ckpt, c.rank, c.bg, c.b, c.tc, 1))
    for k in _halvings(min(c.b, LOGPROB_CHUNK_MAX), 1):
        if x.peak(x.settings(c.quant, c.ckpt, c.rank, c.bg, c.b, c.tc, k)) <= base_peak:
            return k
    return 1


def _no_fit(geometry: ModelGeometry, vram_bytes: int, lengths: list[int], caps: DeviceCaps,
            pins: Mapping[str, Any], base: Mapping[str, Any] | None, encoder_bytes: int) -> str:
    """The one line when nothing fits: what these pins need and, with pins, what fits without them."""
    need = minimum_bytes(geometry, lengths, caps, pins, base=base, encoder_bytes=encoder_bytes)
    if not pins:
        return _no_fit_message(geometry.name, vram_bytes, caps.name, pins, need)
    try:
        free = plan(geometry, vram_bytes, lengths, caps, {}, base=base, encoder_bytes=encoder_bytes)
    except UserError:
        free = None
    bare = (None if free is not None
            else minimum_bytes(geometry, lengths, caps, {}, base=base, encoder_bytes=encoder_bytes))
    return _no_fit_message(geometry.name, vram_bytes, caps.name, pins, need, free, bare)


def minimum_bytes(
    geometry: ModelGeometry,
    prompt_lengths: Iterable[int],
    caps: DeviceCaps = DEVICES["cuda"],
    pins: Mapping[str, Any] | None = None,
    *,
    base: Mapping[str, Any] | None = None,
    encoder_bytes: int = ENCODER_BYTES,
) -> int:
    """The smallest --vram any plan with these pins fits in (the cheapest knobs, shortest completions)."""
    pins = _check_pins(dict(pins or {}), caps)
    start = _start(pins, base)
    tp = _prompt_tokens([int(x) for x in prompt_lengths], start)
    quant = pins.get("quant", "4bit" if caps.cuda else "none")
    s = Settings(
        group_size=start["group_size"], prompts_per_step=start["prompts_per_step"],
        gen_batch=pins.get("gen_batch", 1), micro_batch=pins.get("micro_batch", 1),
        logprob_chunk=pins.get("logprob_chunk", 1), lora_rank=pins.get("lora_rank", MIN_LORA_RANK), quant=quant,
        dtype=_dtype(pins, caps),
        grad_checkpointing=pins.get("grad_checkpointing", True), max_prompt_tokens=start["max_prompt_tokens"],
        max_new_tokens=pins.get("max_new_tokens", min(MIN_NEW_TOKENS, start["max_new_tokens"])))
    need = estimate(geometry, s, tp, caps, encoder_bytes, top_p=start.get("top_p", 1.0),
                    reference=start.get("kl_beta", 0.04) != 0).peak
    return math.ceil(need / (1 - MARGIN))


def _start(pins: Mapping[str, Any], base: Mapping[str, Any] | None) -> dict[str, Any]:
    """The values a search starts from: the paper's, then the task's (`base`), then the pins."""
    return {**PAPER, "lora_rank": DEFAULT_LORA_RANK, **(base or {}), **pins}


def _prompt_tokens(lengths: list[int], start: Mapping[str, Any]) -> int:
    """Tp: the longest sampled prompt, capped at max_prompt_tokens (the cap when there is no sample)."""
    return min(max(lengths), start["max_prompt_tokens"]) if lengths else start["max_prompt_tokens"]


def _dtype(pins: Mapping[str, Any], caps: DeviceCaps) -> str:
    """bf16 where supported, else fp16 on a GPU, fp32 on a CPU; unless pinned."""
    return pins.get("dtype") or ("bf16" if caps.bf16 else "fp16" if caps.fp16 and caps.cuda else "fp32")


def _budget(vram_bytes: int, caps: DeviceCaps) -> int:
    usable = min(vram_bytes, caps.total_bytes) if caps.total_bytes else vram_bytes
    return int(usable * (1 - MARGIN))


def _check_pins(pins: dict[str, Any], caps: DeviceCaps) -> dict[str, Any]:
    unknown = sorted(set(pins) - set(KNOBS))
    if unknown:
        raise UserError(f"unknown setting {', '.join(unknown)}: the planner's settings are {', '.join(KNOBS)}")
    for name, value in pins.items():
        if name in ("quant", "dtype", "grad_checkpointing"):
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{name} must be a whole number of at least 1, not {value!r}")
    if pins.get("group_size", MIN_GROUP_SIZE) < MIN_GROUP_SIZE:
        raise UserError(f"group_size must be at least {MIN_GROUP_SIZE} (advantages are normalised within a group; "
                        f"with {pins['group_size']} completions they are mostly noise)")
    if "quant" in pins and pins["quant"] not in QUANTS:
        raise UserError(f"quant must be one of {', '.join(QUANTS)}, not {pins['quant']!r}")
    if "dtype" in pins:
        if pins["dtype"] not in DTYPES:
            raise UserError(f"dtype must be one of {', '.join(DTYPES)}, not {pins['dtype']!r}")
        if pins["dtype"] == "bf16" and not caps.bf16:
            raise UserError(f"{caps.name} has no bf16: set dtype=fp16" + (" or dtype=fp32" if caps.cuda else "")
                            if caps.fp16 and caps.cuda else f"{caps.name} has no bf16: set dtype=fp32")
        if pins["dtype"] == "fp16" and not (caps.fp16 and caps.cuda):
            raise UserError(f"{caps.name} has no usable fp16: set dtype=fp32")
    if "grad_checkpointing" in pins and not isinstance(pins["grad_checkpointing"], bool):
        raise UserError(f"grad_checkpointing must be true or false, not {pins['grad_checkpointing']!r}")
    if "logprob_chunk" in pins and pins["logprob_chunk"] > pins.get("micro_batch", pins["logprob_chunk"]):
        raise UserError(f"logprob_chunk ({pins['logprob_chunk']}) cannot exceed micro_batch ({pins['micro_batch']})")
    return pins
