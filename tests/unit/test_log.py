"""suzak/log.py: one line format, and progress that is plain periodic lines when the output is not a terminal.

    .venv/bin/python -m pytest tests/unit/test_log.py -q
"""

from __future__ import annotations

import io
import re
import subprocess
import sys

from suzak.log import Progress, get_logger, setup_logging

LINE = re.compile(r"^\[suzak +\d+\.\ds\] ")


def test_lines_have_one_format_with_the_part_and_warnings_named(capsys):
    get_logger("grpo").info("resumed from x")
    get_logger("checkpoint").warning("checkpoint y is unusable")
    get_logger().info("sft: done earlier")
    lines = capsys.readouterr().out.splitlines()
    assert all(LINE.match(line) for line in lines), lines
    assert [LINE.sub("", line) for line in lines] == ["grpo: resumed from x",
                                                       "checkpoint: warning: checkpoint y is unusable",
                                                       "sft: done earlier"]


def test_redirected_progress_is_periodic_single_lines(capsys):
    bar = Progress("sft", 100, bar=False, every_s=3600)
    for step in range(1, 101):
        bar.update(step, f"loss {1 / step:.3f}")
    bar.close()
    out = capsys.readouterr()
    assert "\r" not in out.out + out.err
    lines = out.out.splitlines()
    assert len(lines) == 1 and "sft 100/100 steps (100%" in lines[0] and lines[0].endswith("| loss 0.010")

    every = Progress("eval", 5, bar=False, every_s=0, unit="problem")
    for done in range(1, 6):
        every.update(done)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 5 and "eval 3/5 problems (60%" in lines[2] and "eta" in lines[2] and "eta" not in lines[4]


def test_a_terminal_gets_a_bar_and_disabled_progress_prints_nothing(capsys):
    stream = io.StringIO()
    bar = Progress("grpo", 10, bar=True)
    bar._bar.fp = stream  # tqdm writes through its file wrapper; keep the redraws out of the captured stderr
    bar.update(4, "reward 0.5")
    assert bar._bar.n == 4
    bar.close()
    silent = Progress("grpo", 10, enabled=False)
    silent.update(10, "x")
    assert capsys.readouterr().out == ""


def test_a_redirected_cli_run_writes_no_carriage_returns(tmp_path):
    """`suzak data synth` into a file: progress lines, not redraws."""
    run = subprocess.run([sys.executable, "-m", "suzak", "data", "synth", "clevr", "--n", "3", "--format",
                          "superclevr", "--out", str(tmp_path / "d")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "\r" not in run.stdout + run.stderr
    assert re.search(r"\] synth: synth clevr .*3/3 imgs \(100%", run.stdout), run.stdout


def test_setup_logging_is_idempotent(capsys):
    setup_logging()
    setup_logging()
    get_logger("x").info("once")
    assert capsys.readouterr().out.count("once") == 1


def test_a_redirected_run_switches_off_the_libraries_own_progress_bars():
    """transformers' "Loading weights" bar (tqdm) writes carriage returns; redirected, setup_logging turns it off."""
    code = ("import os; os.environ.pop('HF_HUB_DISABLE_PROGRESS_BARS', None)\n"
            "from suzak.log import setup_logging; setup_logging()\n"
            "from transformers.utils import logging as hf_logging; print(hf_logging.is_progress_bar_enabled())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr[-2000:]
    plain = "from transformers.utils import logging as hf_logging; print(hf_logging.is_progress_bar_enabled())"
    env_free = subprocess.run([sys.executable, "-c", "import os; os.environ.pop('HF_HUB_DISABLE_PROGRESS_BARS', None)"
                               "\n" + plain], capture_output=True, text=True, timeout=120)
    assert env_free.stdout.strip() == "True"  # without suzak's setup the bars are on: the check above could fail
