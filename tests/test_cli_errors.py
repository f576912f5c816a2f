"""User mistakes: each is one line on stderr starting 'tinyrl: error:', exit code 2, no traceback."""

import json
import os
import sys

import pytest

from tinyrl import cli


def run_cli(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["tinyrl", *args])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    err = capsys.readouterr().err.strip()
    return exit_info.value.code, err


def bad_jsonl(tmp_path):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"question": "1+1?", "answer": "2 #### 2"})
    path.write_text(good + "\n" + good + "\n{not json\n")
    return str(path)


def readonly_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    return str(blocker / "run")  # a folder under a regular file can never be created


MISTAKES = {
    "unknown task": (lambda t: ["fit", "chess", "--out", str(t / "r")], "chess"),
    "unknown method": (lambda t: ["fit", "toy", "--method", "ppo", "--out", str(t / "r")], "ppo"),
    "bad value type": (lambda t: ["fit", "toy", "--set", "group_size=many"], "group_size"),
    "unknown setting": (lambda t: ["fit", "toy", "--set", "grop_size=4"], "grop_size"),
    "set without =": (lambda t: ["fit", "toy", "--set", "group_size"], "key=value"),
    "group too small": (lambda t: ["fit", "toy", "--set", "group_size=1"], "group_size"),
    "missing data file": (lambda t: ["fit", "gsm8k", "--data", str(t / "nope.jsonl"), "--out", str(t / "r")],
                          "nope.jsonl"),
    "malformed data line": (lambda t: ["fit", "gsm8k", "--data", bad_jsonl(t), "--out", str(t / "r")], ":3"),
    "hub dataset unreachable": (lambda t: ["fit", "gsm8k", "--out", str(t / "r")], "--data"),
    "missing model folder": (lambda t: ["fit", "toy", "--model", "./no/such/model", "--out", str(t / "r")],
                             "no/such/model"),
    "hub model unreachable": (lambda t: ["fit", "toy", "--model", "nobody/no-such-model", "--out", str(t / "r")],
                              "local folder"),
    "output not writable": (lambda t: ["fit", "toy", "--out", readonly_dir(t)], "--out"),
    "resume without run": (lambda t: ["fit", "toy", "--resume", "--out", str(t / "empty")], "--resume"),
    "eval adapter missing": (lambda t: ["eval", "arith", "--adapter", str(t / "nope")], "--adapter"),
    "bad flag type": (lambda t: ["fit", "toy", "--steps", "ten"], "--steps"),
    "unknown flag": (lambda t: ["fit", "toy", "--stepz", "3"], "--stepz"),
    "few_shot out of range": (lambda t: ["fit", "toy", "--set", "few_shot=3"], "few_shot"),
    "flag and --set disagree": (lambda t: ["fit", "toy", "--steps", "2", "--set", "steps=5", "--out", str(t / "r")],
                                "steps is given twice (--steps 2 and --set steps=...)"),
    "method twice": (lambda t: ["fit", "toy", "--method", "r1", "--set", "method=cosine", "--out", str(t / "r")],
                     "method is given twice"),
    "out twice": (lambda t: ["fit", "toy", "--out", str(t / "r"), "--set", f"out={t / 'r2'}"], "out is given twice"),
    "task twice": (lambda t: ["fit", "toy", "--set", "task=arith", "--out", str(t / "r")],
                   "task is given twice (the TASK argument"),
    "vram without a unit": (lambda t: ["fit", "toy", "--vram", "8", "--out", str(t / "r")], "write e.g. 8G"),
    "plan vram without a unit": (lambda t: ["plan", "gsm8k", "--vram", "8"], "needs a unit"),
    "run folder as --model": (lambda t: ["fit", "toy", "--model", run_folder(t), "--out", str(t / "r")],
                              "is a tinyrl run folder, not a base model"),
    "checkpoint as --model": (lambda t: ["eval", "arith", "--model", checkpoint_folder(t)],
                              "is a LoRA adapter (a tinyrl checkpoint), not a base model: pass --adapter"),
    "eval toy": (lambda t: ["eval", "toy"], "no answers to check"),
}


def run_folder(tmp_path):
    from tinyrl import config

    run = tmp_path / "a-run"
    run.mkdir(exist_ok=True)
    config.save(config.Config(task="toy", model="smollm2-135m", out=str(run)), str(run / "config.json"))
    return str(run)


def checkpoint_folder(tmp_path):
    ckpt = tmp_path / "a-run" / "checkpoints" / "step-000002"
    ckpt.mkdir(parents=True, exist_ok=True)
    (ckpt / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/models/base"}))
    return str(ckpt)


def test_wandb_without_a_login_is_one_line_before_the_run_folder(tmp_path, monkeypatch, capsys):
    pytest.importorskip("wandb")
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    code, err = run_cli(monkeypatch, capsys, "fit", "toy", "--set", "report_to=wandb", "--out", str(tmp_path / "r"))
    assert code == 2 and len(err.splitlines()) == 1
    assert "no W&B login found" in err and "wandb login" in err and "WANDB_MODE=offline" in err
    assert not os.path.exists(tmp_path / "r")
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password abc\n")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    from tinyrl import config

    assert config.wandb_login_found()
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert config.wandb_login_found()


def test_help_examples_fit_80_columns_and_each_command_has_its_own(monkeypatch, capsys):
    for text in (cli.EXAMPLES, cli.FIT_EXAMPLES, cli.EVAL_EXAMPLES, cli.PLAN_EXAMPLES):
        assert all(len(line) <= 80 for line in text.splitlines()), text
        assert "shared/" not in text
    assert len({cli.EXAMPLES, cli.FIT_EXAMPLES, cli.EVAL_EXAMPLES, cli.PLAN_EXAMPLES}) == 4
    monkeypatch.setattr(sys, "argv", ["tinyrl", "fit", "--help"])
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps the table to the terminal
    try:
        cli.main()
    except SystemExit as done:
        assert not done.code
    out = " ".join(capsys.readouterr().out.split())
    assert "Default: Qwen/Qwen2.5-0.5B-Instruct" in out and "Default: r1" in out and "Default: 0" in out


@pytest.mark.parametrize("name", sorted(MISTAKES))
def test_user_mistake_is_one_line_exit_2(name, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    make_args, needle = MISTAKES[name]
    code, err = run_cli(monkeypatch, capsys, *make_args(tmp_path))
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("tinyrl: error:") and needle in lines[0], lines[0]
    assert "Traceback" not in err
    assert not os.path.exists(tmp_path / "r" / "config.json")  # a failed start leaves no run behind


def test_existing_run_with_other_settings_is_refused(tiny_model, tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "run")
    os.makedirs(out)
    from tinyrl import config

    config.save(config.Config(task="toy", model=tiny_model, out=out, group_size=4), os.path.join(out, "config.json"))
    code, err = run_cli(monkeypatch, capsys, "fit", "toy", "--model", tiny_model, "--out", out)
    assert code == 2 and "--resume" in err and "group_size=4" in err


def test_plan_prints_the_byte_table_without_weights(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["tinyrl", "plan", "gsm8k", "--vram", "8G", "--model",
                                      "Qwen/Qwen2.5-0.5B-Instruct"])
    cli.main()
    out = capsys.readouterr().out
    assert "KV cache" in out and "micro_batch" in out and "group_size               16" in out


def test_plan_impossible_budget_is_one_line(monkeypatch, capsys):
    code, err = run_cli(monkeypatch, capsys, "plan", "gsm8k", "--vram", "1G", "--model", "Qwen/Qwen2.5-0.5B-Instruct")
    assert code == 2 and "does not fit" in err and "needs" in err and len(err.splitlines()) == 1


def test_plan_refuses_a_model_that_transforms_its_logits_in_one_line(monkeypatch, capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "gemma2", "hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 64, "intermediate_size": 512, "vocab_size": 1000,
        "final_logit_softcapping": 30.0}))
    code, err = run_cli(monkeypatch, capsys, "plan", "gsm8k", "--vram", "8G", "--model", str(tmp_path))
    assert code == 2 and "final_logit_softcapping" in err and len(err.splitlines()) == 1


def test_a_refusal_suggests_resume_only_where_it_helps(tiny_model, tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "run")
    os.makedirs(out)
    from tinyrl import config

    config.save(config.Config(task="toy", model=tiny_model, out=out, steps=4), os.path.join(out, "config.json"))
    code, err = run_cli(monkeypatch, capsys, "fit", "arith", "--model", tiny_model, "--out", out, "--steps", "4")
    assert code == 2 and "task cannot change in a run, even with --resume" in err and "pass --resume" not in err
    code, err = run_cli(monkeypatch, capsys, "fit", "toy", "--model", tiny_model, "--out", out, "--steps", "8")
    assert code == 2 and "pass --resume to continue it with yours" in err


def test_vram_without_a_gpu_says_it_budgets_ram(tmp_path, monkeypatch, capsys):
    from tinyrl import loop

    monkeypatch.setattr(loop, "fit", lambda cfg, **kw: None)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.setattr(sys, "argv", ["tinyrl", "fit", "toy", "--vram", "4G", "--out", str(tmp_path / "r")])
    cli.main()
    assert "no CUDA device here: --vram 4G budgets this machine's RAM" in capsys.readouterr().err


def test_resume_with_another_task_names_the_runs_task_not_its_data(tmp_path, monkeypatch, capsys):
    """The run's saved --data (a gsm8k folder) must not surface as an error about a flag the user did not pass."""
    from tinyrl import config

    run = tmp_path / "run"
    run.mkdir()
    config.save(config.Config(task="gsm8k", data=str(tmp_path / "gsm8k"), out=str(run)), str(run / "config.json"))
    code, err = run_cli(monkeypatch, capsys, "fit", "toy", "--out", str(run), "--resume")
    assert code == 2 and "is a gsm8k run and its task cannot change" in err and "--data" not in err
