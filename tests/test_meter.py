"""Collapse warnings, the report, and crash-safe jsonl handling."""

import json

import pytest

from tinyrl import meter

HEALTHY = {"len/frac_at_cap": 0.1, "len/frac_short": 0.0, "groups/frac_zero_var": 0.2, "correct": 0.3,
           "reward/xml_count": 0.2, "reward/soft_format": 0.0, "reward/strict_format": 0.1}


def test_healthy_history_gives_no_warning():
    assert meter.collapse_warnings([HEALTHY] * 10) == []
    assert meter.collapse_warnings([{**HEALTHY, "len/frac_at_cap": 1.0}] * 4) == []  # fewer than 5 steps


def test_each_collapse_indicator_trips():
    def warn(**change):
        return " ".join(meter.collapse_warnings([{**HEALTHY, **change}] * 10))

    assert "pinned at the cap" in warn(**{"len/frac_at_cap": 0.95})
    assert "under 16 tokens" in warn(**{"len/frac_short": 0.8})
    assert "identical rewards" in warn(**{"groups/frac_zero_var": 1.0})
    farming = {"reward/xml_count": 0.5, "reward/soft_format": 0.5, "reward/strict_format": 0.5, "correct": 0.0}
    assert "format reward saturated" in warn(**farming)
    improving = [{**HEALTHY, **farming, "correct": 0.0}] * 5 + [{**HEALTHY, **farming, "correct": 0.5}] * 5
    assert not any("format" in w for w in meter.collapse_warnings(improving))


def test_truncate_keeps_complete_rows_up_to_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 6)) + '{"step": 6, "rew')
    assert [r["step"] for r in meter.read_jsonl(str(path))] == [1, 2, 3, 4, 5]  # the cut line is ignored
    meter.truncate_jsonl(str(path), 3)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]


def test_report_shows_first_and_last(tmp_path):
    rows = [{"step": s, "reward/total": s / 10, "reward/digits": s / 10, "correct": 0.0, "len/mean": 20.0}
            for s in range(1, 11)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = meter.report(str(tmp_path))
    assert "reward/total" in text and "0.150 ->    0.950" in text


def vm_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def test_a_cpu_phase_starts_without_the_last_ones_freed_heap():
    import os

    import torch

    if not os.path.exists("/proc/self/status") or meter._malloc_trim() is None:
        pytest.skip("needs Linux with glibc")
    tensors = [torch.ones(25_000) for _ in range(2000)]  # 200 MB of 100 KB blocks: on glibc's heap, not mmap'd
    kept = tensors[9::10]  # every tenth stays, so the freed blocks are holes that brk cannot give back
    del tensors
    before = vm_rss()
    with meter.phase({}, {}, "next", torch.device("cpu")):
        after = vm_rss()
    assert before - after > 100 * 2**20 and len(kept) == 200


def test_progress_inside_a_step_is_a_line_at_most_every_so_often_off_a_terminal(tmp_path, monkeypatch, capsys):
    """#27: a CPU step of minutes is not silent: off a terminal a line now and then; a fast step adds none."""
    from tinyrl import meter as meter_mod

    log = meter_mod.Meter(str(tmp_path), total=20, start=0)
    log.within(3, "generating", 16, 256)  # within WITHIN_EVERY of the start: nothing
    assert capsys.readouterr().out == ""
    monkeypatch.setattr(meter_mod, "WITHIN_EVERY", 0.0)
    log.within(3, "generating", 32, 256)
    log.within(3, "generating", 256, 256)  # the phase is done: the step line follows, no progress line
    assert capsys.readouterr().out == "  step 3/20: generating 32/256\n"
    quiet = meter_mod.Meter(str(tmp_path), total=20, start=0, quiet=True)
    quiet.within(3, "training", 8, 256)
    assert capsys.readouterr().out == ""
