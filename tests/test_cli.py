"""The famex command: lists every stage, explains unbuilt ones, prints user errors without tracebacks."""

from __future__ import annotations

import subprocess
import sys

import famex.cli as cli
from famex.cli import COMMANDS, Command

STAGES = ["data", "logits", "distill", "sft", "dpo", "quantize", "export", "eval", "report", "run", "info", "cost"]


def run_famex(*args):
    return subprocess.run([sys.executable, "-m", "famex", *args], capture_output=True, text=True)


def test_help_lists_every_stage():
    r = run_famex("--help")
    assert r.returncode == 0
    for name in STAGES:
        assert f"\n  {name} " in r.stdout, name


def test_unbuilt_command_says_what_is_missing(monkeypatch, capsys):
    monkeypatch.setitem(COMMANDS, "future", Command("famex.does_not_exist", "later", "time travel"))
    assert cli.main(["future"]) == 3
    assert "time travel is not built yet" in capsys.readouterr().err


def test_unknown_command_suggests():
    r = run_famex("distil")
    assert r.returncode == 2 and "did you mean 'distill'" in r.stderr


def test_user_error_is_one_line_exit_2():
    r = run_famex("info", "--preset", "no-such-preset")
    assert r.returncode == 2
    assert "unknown preset 'no-such-preset'" in r.stderr and "Traceback" not in r.stderr
