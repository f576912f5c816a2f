"""The device, as the planner sees it: what a card can do that changes the plan.

Owns DeviceCaps, the presets of DEVICES (a T4, an H100, a CPU...), `device_caps` (a preset by name, for
`tinyrl plan --gpu`) and `detect_caps` (the device this process would train on, the one place the planner imports
torch, lazily). Imports budget.units and tinyrl.errors only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

from tinyrl.budget.units import MiB
from tinyrl.errors import UserError


@dataclass(frozen=True)
class DeviceCaps:
    """What a device can do that changes the plan."""

    name: str
    total_bytes: int  # memory it exposes (nvidia-smi's total); 0 when unknown: --vram is trusted
    bf16: bool  # native bfloat16 (compute capability >= 8.0)
    fp16: bool = True  # usable float16 (sm60+)
    cuda: bool = True  # False: a CPU run (RAM is the budget, no 4-bit, fp32)
    fused_attention: bool = True  # SDPA kernel that never materialises [B, H, T, T]; False: eager attention


# Totals are approximately what nvidia-smi reports (ECC and driver reservations already taken off).
DEVICES: dict[str, DeviceCaps] = {
    "T4": DeviceCaps("T4", 15360 * MiB, bf16=False),
    "P100": DeviceCaps("P100", 16280 * MiB, bf16=False),
    "V100": DeviceCaps("V100", 16160 * MiB, bf16=False),
    "L4": DeviceCaps("L4", 22491 * MiB, bf16=True),
    "A10G": DeviceCaps("A10G", 22731 * MiB, bf16=True),
    "A100": DeviceCaps("A100", 81920 * MiB, bf16=True),
    "A100-40G": DeviceCaps("A100-40G", 40960 * MiB, bf16=True),
    "H100": DeviceCaps("H100", 81559 * MiB, bf16=True),
    "cuda": DeviceCaps("cuda", 0, bf16=True),  # an unnamed modern GPU: the default for `tinyrl plan`
    "cpu": DeviceCaps("cpu", 0, bf16=False, fp16=False, cuda=False),
}


def device_caps(name: str) -> DeviceCaps:
    """A preset by name, case-insensitive ('t4', 'H100', 'cpu')."""
    for key, caps in DEVICES.items():
        if key.lower() == name.strip().lower():
            return caps
    raise UserError(f"unknown device {name!r}: use one of {', '.join(DEVICES)}")


def detect_caps(device: str = "auto") -> DeviceCaps:
    """The device this process would train on (`device`: the run's --device: auto, cpu, cuda or cuda:N). Imports
    torch, so only call it when about to train."""
    import torch  # noqa: PLC0415 - deliberately lazy: `plan` must not pay for torch

    if device == "cpu" or not torch.cuda.is_available():
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        return replace(DEVICES["cpu"], total_bytes=pages * size)
    index = torch.device(device).index if device.startswith("cuda") else None
    props = torch.cuda.get_device_properties(index or 0)
    return DeviceCaps(props.name, props.total_memory, bf16=props.major >= 8, fp16=props.major >= 6)
