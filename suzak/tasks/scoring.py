"""Benchmark scoring: SuperCLEVR counting and GeoQA, under R1-V's eval rules ("r1v") or stricter ones ("strict").

"r1v" reproduces R1-V's eval scripts so numbers compare with its README; "strict" first takes the content of
the single <answer> tag, so an answer that appears only in the reasoning, or hedges between candidates, is wrong.
`wilson_interval` gives the 95% confidence interval that goes next to every reported accuracy.

Run the tests: .venv/bin/python -m pytest tests/unit/test_scoring.py -q
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

from suzak.errors import SuzakError
from suzak.tasks.rewards import (
    math_answers_match,
    parse_math_answer,
    parse_number_answer,
    safe_parse,
    safe_verify,
    single_answer,
)

Failure = Literal["no_tag", "unparsable", "wrong"]
SCORING_MODES = ("r1v", "strict")

# R1-V's test_qwen2vl_counting_superclevr.py: the first such match is the answer.
_R1V_COUNT_ANSWER = re.compile(r"<answer>\s*(\d+)\s*</answer>")


@dataclass(frozen=True)
class Score:
    """One scored prediction: what was taken as the answer, whether it is right, and why not."""

    extracted: str | None
    correct: bool
    failure: Failure | None  # None exactly when correct

    def to_dict(self) -> dict:
        return {"extracted": self.extracted, "correct": self.correct, "failure": self.failure}


def _right(extracted: str) -> Score:
    return Score(extracted=extracted, correct=True, failure=None)


def _wrong(extracted: str | None, failure: Failure) -> Score:
    return Score(extracted=extracted, correct=False, failure=failure)


def _check_mode(mode: str) -> None:
    if mode not in SCORING_MODES:
        raise SuzakError(f"eval.scoring: unknown scoring mode {mode!r}; use one of {', '.join(SCORING_MODES)}.")


def _strict_answer(output: str) -> tuple[str | None, Failure | None]:
    """The single <answer> content, or why there is none (no tag at all vs. a malformed/repeated/empty tag)."""
    if "<answer>" not in output:
        return None, "no_tag"
    answer = single_answer(output)
    if answer is None:
        return None, "unparsable"
    return answer, None


# ---------------------------------------------------------------- SuperCLEVR


def _ground_truth_count(ground_truth: object) -> int:
    # JSON files sometimes carry "4" instead of 4; anything that is not a whole number is a data error.
    if isinstance(ground_truth, bool):
        raise SuzakError(f"SuperCLEVR ground_truth {ground_truth!r} must be an integer count such as 4.")
    if isinstance(ground_truth, int):
        return ground_truth
    if isinstance(ground_truth, str) and ground_truth.strip().isdigit():
        return int(ground_truth.strip())
    raise SuzakError(f"SuperCLEVR ground_truth {ground_truth!r} must be an integer count such as 4.")


def score_superclevr(output: str, ground_truth: int, mode: str = "r1v") -> Score:
    """Score one counting answer.

    r1v: the first `<answer> N </answer>` match, compared as int; strict: the single <answer> tag must hold
    exactly one integer (see rewards.parse_number_answer).
    """
    _check_mode(mode)
    truth = _ground_truth_count(ground_truth)
    output = output if isinstance(output, str) else ""
    if mode == "r1v":
        match = _R1V_COUNT_ANSWER.search(output)
        if match is None:
            return _wrong(None, "no_tag" if "<answer>" not in output else "unparsable")
        extracted = match.group(1)
        # int() raises past 4300 digits; no count is that long, so such an answer is simply wrong.
        same = len(extracted) <= 30 and int(extracted) == truth
        return _right(extracted) if same else _wrong(extracted, "wrong")
    answer, failure = _strict_answer(output)
    if failure:
        return _wrong(None, failure)
    value = parse_number_answer(answer)
    if value is None:
        return _wrong(answer, "unparsable")
    return _right(answer) if value == truth else _wrong(answer, "wrong")


# ---------------------------------------------------------------- GeoQA


def score_geoqa(output: str, ground_truth: str, mode: str = "r1v") -> Score:
    """Score one geometry answer.

    r1v: as R1-V's test_qwen2vl_geoqa.py, `verify(parse(output), parse(ground_truth))` on the whole output
    (no tag needed; failure is "unparsable" when math_verify finds nothing, else "wrong").
    strict: the single <answer> content compared by value with the ground truth (rewards.math_answers_match);
    a hedged ("3 or 4") or non-math answer fails as "unparsable".
    """
    _check_mode(mode)
    if not isinstance(ground_truth, str) or not ground_truth.strip():
        raise SuzakError(f"GeoQA ground_truth {ground_truth!r} must be a non-empty string such as '140°'.")
    output = output if isinstance(output, str) else ""
    if mode == "r1v":
        model_answer = safe_parse(output)
        if not model_answer:
            return _wrong(None, "unparsable")
        extracted = str(model_answer[0])
        if safe_verify(model_answer, safe_parse(ground_truth)):
            return _right(extracted)
        return _wrong(extracted, "wrong")
    answer, failure = _strict_answer(output)
    if failure:
        return _wrong(None, failure)
    if math_answers_match(answer, ground_truth):
        return _right(answer)
    # Say "unparsable" for hedged or non-math answers so a report can tell them from wrong values.
    return _wrong(answer, "wrong" if parse_math_answer(answer) else "unparsable")


# ---------------------------------------------------------------- confidence intervals


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for an accuracy of correct/n; (0.0, 1.0) when n is 0."""
    if n < 0 or correct < 0 or correct > n:
        raise SuzakError(f"wilson_interval: need 0 <= correct <= n, got correct={correct}, n={n}.")
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    z2 = z * z
    denominator = 1.0 + z2 / n
    center = (p + z2 / (2 * n)) / denominator
    half_width = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denominator
    return max(0.0, center - half_width), min(1.0, center + half_width)
