"""math-verify in a child process, so that its time limit holds in any thread and over C code.

`check(completions, golds, gold_format)` says whether each completion's answer equals its gold's value, read the
way LightEval's extractive match reads them (docs: memory-r-plus.md §7): a completion's `<answer>` tag first (the
whole text when the tag holds nothing math-verify extracts), as an expression or LaTeX with `\\boxed{}` first,
numbers equal to 5 decimals. The gold is a plain expression (`gold_format="expr"`: GSM8K's numbers) or the LaTeX
content of a solution's last `\\boxed{}` (`"latex"`: MATH, AI-MO, AIME answers such as `\\frac{3}{4}`,
`(-\\infty, 3]`, `\\text{(B)}`), read as `$\\boxed{...}$`. `gold_parses(golds, gold_format)` says whether
math-verify extracts anything from each gold: a gold that does not parse matches nothing, so the loop skips its
example (as open-r1 does).

Why a child process: math-verify's own time limits use SIGALRM, which only the main thread may set, so in a worker
thread (TRL's reward functions, an evaluation thread) they are off and a pathological completion runs as long as it
takes (a long run of `1+1+...+1` followed by a letter costs its expression regex quadratic time: minutes at 100k
characters); and an alarm is only acted on between bytecodes, never inside one long C call. Here the parse/verify
work runs in one persistent child process (multiprocessing "spawn", started on first use, reused, shut down at exit).
The parent sends a batch and waits at most `timeout` seconds for each item's answer (a fresh child gets STARTUP_S
more to import sympy and math-verify); an item that does not answer in time counts as False, the child is killed,
and a new one takes the remaining items. Inside the child math-verify's own limits are on as well (whole seconds,
rounded up), which ends slow Python-level work without a restart. `timeouts()` counts the items given up on: out of
time either way, or the child died on them. Calls from several threads take turns (one lock).

Spawning is not optional: if the child cannot start, `check` raises RuntimeError; nothing falls back to running
math-verify in this process. Unlike a plain spawn, the child does not re-run the parent's `__main__` (it is hidden
while the child starts): a user's script that calls tinyrl.fit at top level, with no `if __name__ == "__main__":`,
works.
"""

from __future__ import annotations

import atexit
import logging
import math
import multiprocessing
import os
import signal
import sys
import threading
import traceback
import types

GOLD_FORMATS = ("expr", "latex")
STARTUP_S = 60.0  # a fresh child's allowance for importing sympy and math-verify, in seconds (took ~1 s here)

_SPAWN = multiprocessing.get_context("spawn")
_lock = threading.Lock()
_child: _Child | None = None
_timeouts = 0


def check(completions: list[str], golds: list[str], gold_format: str = "expr",
          timeout: float = 5.0) -> list[bool]:
    """Whether each completion's answer equals its gold's value (math-verify, at most `timeout` s per completion).

    >>> check(["<answer>0.75</answer>", "so $\\\\boxed{\\\\dfrac{3}{4}}$", "<answer>3/5</answer>"],
    ...       ["\\\\frac{3}{4}"] * 3, "latex")
    [True, True, False]
    """
    _require(completions, golds, gold_format)
    seconds = _alarm_seconds(timeout)
    return [bool(ok) for ok in _run(_check_one, [(c, g, gold_format, seconds) for c, g in zip(completions, golds)],
                                    timeout)]


def gold_parses(golds: list[str], gold_format: str = "expr", timeout: float = 5.0) -> list[bool]:
    """Whether math-verify extracts anything from each gold (read as `check` reads it).

    >>> gold_parses(["\\\\frac{3}{4}", "(-\\\\infty, 3]", ""], "latex")
    [True, True, False]
    """
    _require(golds, golds, gold_format)
    seconds = _alarm_seconds(timeout)
    return [bool(ok) for ok in _run(_gold_parses_one, [(g, gold_format, seconds) for g in golds], timeout)]


def timeouts() -> int:
    """How many items this process has scored False because their check did not finish: out of time (in the
    parent's wait or math-verify's own alarm) or the child died on them. Only grows; the loop logs it."""
    return _timeouts


def _require(texts: list[str], golds: list[str], gold_format: str) -> None:
    if gold_format not in GOLD_FORMATS:
        raise ValueError(f"gold_format must be one of {', '.join(GOLD_FORMATS)}, not {gold_format!r}")
    if len(golds) != len(texts):
        raise ValueError("check needs one gold per completion")
    if not all(isinstance(t, str) for t in (*texts, *golds)):
        raise TypeError("completions and golds must be strings")


def _alarm_seconds(timeout: float) -> int:
    """math-verify's alarm takes whole seconds."""
    if not timeout > 0:
        raise ValueError(f"timeout must be positive, not {timeout!r}")
    return max(1, math.ceil(timeout))


# ---- the parent's side ----

def _run(fn, items: list[tuple], timeout: float) -> list:
    """`fn(*args)` for each args of `items`, in the child, in order; None for an item given up on (module docstring).

    `fn` is pickled by reference: any importable module-level function works (the tests pass their own)."""
    global _child, _timeouts
    results: list = [None] * len(items)
    with _lock:
        done = 0
        while done < len(items):
            fresh = _child is None
            if fresh:
                _child = _Child()
            child = _child
            try:
                child.conn.send((fn, items[done:]))
            except OSError:  # it died while idle (killed from outside): start another, once
                _child = None
                child.stop()
                if fresh:
                    raise RuntimeError("math-verify's child process died as soon as it started") from None
                continue
            try:
                while done < len(items):
                    try:
                        reply = child.receive(timeout)
                    except (EOFError, OSError):  # it died on this item
                        reply = None
                    if reply is None:  # out of time, or died
                        _timeouts += 1
                        done += 1
                        _child = None
                        child.stop()
                        break
                    if reply[0] == "error":
                        raise RuntimeError(f"math-verify's child process failed on an item:\n{reply[1]}")
                    results[done] = reply[1]
                    _timeouts += reply[2]
                    done += 1
            except BaseException:  # its remaining answers would be read by the next call: end it
                _child = None
                child.stop()
                raise
    return results


class _Child:
    """One child process and the parent's end of its pipe; ready (math-verify imported) once constructed."""

    def __init__(self):
        self.conn, theirs = _SPAWN.Pipe()
        self.process = _SPAWN.Process(target=_serve, args=(theirs,), name="tinyrl-math-verify", daemon=True)
        main = sys.modules.get("__main__")
        # spawn re-runs the parent's __main__ in the child unless it has none: the child needs only this module, and
        # a user's script without `if __name__ == "__main__":` (one calling tinyrl.fit at top level) must not rerun
        sys.modules["__main__"] = types.ModuleType("__main__")
        try:
            self.process.start()
        finally:
            sys.modules["__main__"] = main
            theirs.close()  # the child holds its own copy: EOF here once it dies
        try:
            reply = self.receive(STARTUP_S)
        except (EOFError, OSError):  # it died
            self.stop(grace=5.0)
            raise RuntimeError(f"math-verify's child process exited with code {self.process.exitcode} while "
                               "starting; its error is on stderr") from None
        if reply is not None and reply[0] == "ready":
            return
        self.stop()
        if reply is not None:
            raise RuntimeError(f"math-verify's child process failed to start:\n{reply[1]}")
        raise RuntimeError(f"math-verify's child process did not start within {STARTUP_S:.0f} s")

    def receive(self, seconds: float):
        """The child's next message, or None if it sends none within `seconds`; EOFError if it has died."""
        return self.conn.recv() if self.conn.poll(seconds) else None

    def stop(self, grace: float = 0.0) -> None:
        """Close the pipe (an idle child exits on it), wait `grace` s, then kill: it may be stuck in C code."""
        self.conn.close()
        self.process.join(grace)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


def _shutdown() -> None:
    global _child
    child, _child = _child, None  # no lock: at exit a daemon thread may hold it, mid-batch
    if child is not None:
        child.stop(grace=1.0)


def _forget_after_fork() -> None:
    """A forked process neither owns its parent's child nor may wait on a lock another thread held."""
    global _child, _lock
    _child, _lock = None, threading.Lock()


atexit.register(_shutdown)
os.register_at_fork(after_in_child=_forget_after_fork)


# ---- the child's side ----

class _TimeoutCount(logging.Handler):
    """Counts math-verify's "Timeout during parsing/comparison" warnings: its own alarm fired."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record):
        self.count += str(record.msg).startswith("Timeout during")


def _serve(conn) -> None:
    """The child: import math-verify, say ready, then answer each batch one item at a time until the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's; this process ends when the pipe closes
    try:
        count = _TimeoutCount()
        log = logging.getLogger("math_verify")
        log.addHandler(count)
        log.propagate = False  # its timeout warnings quote the whole completion; they are counted instead
        _check_one("<answer>1</answer>", "1", "expr", 5)  # imports sympy and compiles the regexes before "ready"
        _check_one("$\\frac{1}{2}$", "\\frac{1}{2}", "latex", 5)
    except Exception:
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(("ready",))
    while True:
        try:
            fn, items = conn.recv()
        except EOFError:
            return
        for args in items:
            seen = count.count
            try:
                value = fn(*args)
            except Exception:
                conn.send(("error", traceback.format_exc()))
                return
            conn.send(("ok", value, count.count > seen))


def _parse_gold(gold: str, gold_format: str, seconds: int | None):
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    if gold_format == "latex":
        return parse("$\\boxed{" + gold + "}$", (LatexExtractionConfig(), ExprExtractionConfig()),
                     parsing_timeout=seconds)
    return parse(gold, (ExprExtractionConfig(),), parsing_timeout=seconds)


def _own_alarm(seconds: int) -> int | None:
    """math-verify's own limit where it may set an alarm (the main thread: always, in the child), else off."""
    return seconds if threading.current_thread() is threading.main_thread() else None


def _check_one(completion: str, gold: str, gold_format: str, seconds: int) -> bool:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    from tinyrl.rewards.gsm8k import extract_answer  # here, not at the top: gsm8k imports this module

    seconds = _own_alarm(seconds)
    targets = (ExprExtractionConfig(), LatexExtractionConfig(boxed_match_priority=0))
    found = []
    if "<answer>" in completion:
        tagged = extract_answer(completion)
        if gold_format == "latex" and "$" not in tagged and "\\boxed" not in tagged and "\\" in tagged:
            tagged = f"${tagged}$"  # LaTeX written bare in the tag (`5\\sqrt{2}`): read it as math, not as "5"
        found = parse(tagged, targets, parsing_timeout=seconds)
    found = found or parse(completion, targets, parsing_timeout=seconds)
    return verify(_parse_gold(gold, gold_format, seconds), found, float_rounding=5, timeout_seconds=seconds)


def _gold_parses_one(gold: str, gold_format: str, seconds: int) -> bool:
    return len(_parse_gold(gold, gold_format, _own_alarm(seconds))) > 0
