"""Tests of suzak.tasks.scoring: SuperCLEVR and GeoQA scoring in r1v and strict modes, failure kinds, Wilson intervals.

Run: .venv/bin/python -m pytest tests/unit/test_scoring.py -q
"""

from __future__ import annotations

import pytest

from suzak.errors import SuzakError
from suzak.tasks import rewards
from suzak.tasks.scoring import Score, score_geoqa, score_superclevr, wilson_interval


def reply(answer: str, think: str = "Let me look.") -> str:
    return f"<think>{think}</think><answer>{answer}</answer>"


# ---------------------------------------------------------------- SuperCLEVR, r1v


@pytest.mark.parametrize(
    ("output", "truth", "expected"),
    [
        (reply("4"), 4, Score("4", True, None)),
        (reply(" 4 "), 4, Score("4", True, None)),
        ("<answer>\n4\n</answer>", 4, Score("4", True, None)),  # \s matches newlines
        (reply("5"), 4, Score("5", False, "wrong")),
        ("I see 4 objects.", 4, Score(None, False, "no_tag")),
        (reply("four"), 4, Score(None, False, "unparsable")),
        (reply("4.0"), 4, Score(None, False, "unparsable")),
        ("<answer>4", 4, Score(None, False, "unparsable")),
        # First match wins, even when a later tag holds the right count.
        (reply("3") + "<answer>4</answer>", 4, Score("3", False, "wrong")),
        # A hedged first tag does not match the pattern, so R1-V takes the next tag.
        (reply("3 or 4") + "<answer>4</answer>", 4, Score("4", True, None)),
    ],
)
def test_superclevr_r1v(output, truth, expected):
    assert score_superclevr(output, truth, mode="r1v") == expected


def test_superclevr_huge_number_is_wrong_not_an_error():
    # int() raises past 4300 digits; R1-V's script would crash here.
    assert score_superclevr(reply("9" * 5000), 4) == Score("9" * 5000, False, "wrong")
    assert score_superclevr(reply("9" * 5000), 4, mode="strict") == Score("9" * 5000, False, "unparsable")


def test_superclevr_r1v_is_the_default_mode():
    assert score_superclevr(reply("3") + "<answer>4</answer>", 3) == Score("3", True, None)


# ---------------------------------------------------------------- SuperCLEVR, strict


@pytest.mark.parametrize(
    ("output", "truth", "expected"),
    [
        (reply("4"), 4, Score("4", True, None)),
        (reply("4.0"), 4, Score("4.0", True, None)),
        (reply("four"), 4, Score("four", True, None)),
        (reply("5"), 4, Score("5", False, "wrong")),
        ("I see 4 objects.", 4, Score(None, False, "no_tag")),
        (reply(""), 4, Score(None, False, "unparsable")),
        (reply("3, 4"), 4, Score("3, 4", False, "unparsable")),
        (reply("3 4"), 4, Score("3 4", False, "unparsable")),
        (reply("3") + "<answer>4</answer>", 4, Score(None, False, "unparsable")),
        (reply("3 or 4") + "<answer>4</answer>", 4, Score(None, False, "unparsable")),
        ("<answer>4", 4, Score(None, False, "unparsable")),
    ],
)
def test_superclevr_strict(output, truth, expected):
    assert score_superclevr(output, truth, mode="strict") == expected


def test_superclevr_accepts_a_digit_string_ground_truth():
    assert score_superclevr(reply("7"), "7").correct
    assert score_superclevr(reply("7"), " 7 ", mode="strict").correct


@pytest.mark.parametrize("truth", ["four", 4.5, None, True, "-3"])
def test_superclevr_bad_ground_truth_is_a_user_error(truth):
    with pytest.raises(SuzakError, match="integer count"):
        score_superclevr(reply("4"), truth)


def test_non_string_output_scores_as_missing_tag():
    assert score_superclevr(None, 4) == Score(None, False, "no_tag")  # type: ignore[arg-type]
    assert score_geoqa(None, "4", mode="strict") == Score(None, False, "no_tag")  # type: ignore[arg-type]


# ---------------------------------------------------------------- GeoQA, r1v


@pytest.mark.parametrize(
    ("output", "truth", "correct", "failure"),
    [
        ("The angle is 140°", "140°", True, None),  # no tag needed: the whole output is parsed
        (reply(" 2.4 "), "\\frac{12}{5}", True, None),
        (reply(" 120° "), "140°", False, "wrong"),
        ("no numbers here", "140°", False, "unparsable"),
        # math_verify only finds a number after a space, "=" or the start, so "<answer>140°" is invisible
        # and the number in the reasoning is taken instead.
        (reply("140°", think="angle A is 80°"), "140°", False, "wrong"),
        # R1-V parses "6√{2}" as 6, so a bare coefficient counts as right.
        ("The answer is 6", "6√{2}", True, None),
        # Hedging pays: math_verify takes the last candidate.
        (reply("3 or 4"), "4", True, None),
    ],
)
def test_geoqa_r1v(output, truth, correct, failure):
    score = score_geoqa(output, truth, mode="r1v")
    assert (score.correct, score.failure) == (correct, failure)
    assert (score.extracted is None) == (failure == "unparsable")


def test_geoqa_r1v_passes_output_in_math_verifys_gold_slot(monkeypatch):
    # R1-V's test_qwen2vl_geoqa.py: verify(parse(output), parse(ground_truth)).
    calls = []

    def recording_verify(gold, target, **kwargs):
        calls.append((gold, target))
        return False

    monkeypatch.setattr(rewards, "verify", recording_verify)
    score_geoqa("The value is 7", "5", mode="r1v")
    assert calls and calls[0][0][0] == 7 and calls[0][1][0] == 5


def test_geoqa_r1v_reports_the_parsed_value():
    assert score_geoqa("so x = \\frac{12}{5} then", "2.4").extracted == "12/5"


# ---------------------------------------------------------------- GeoQA, strict


@pytest.mark.parametrize(
    ("output", "truth", "expected"),
    [
        (reply("140°", think="angle A is 80°"), "140°", Score("140°", True, None)),
        (reply("140"), "140°", Score("140", True, None)),
        (reply("2.4"), "\\frac{12}{5}", Score("2.4", True, None)),
        (reply("6\\sqrt{2}"), "6√{2}", Score("6\\sqrt{2}", True, None)),
        (reply("6"), "6√{2}", Score("6", False, "wrong")),
        (reply("120°"), "140°", Score("120°", False, "wrong")),
        ("The angle is 140°", "140°", Score(None, False, "no_tag")),
        (reply(""), "140°", Score(None, False, "unparsable")),
        (reply("3 or 4"), "4", Score("3 or 4", False, "unparsable")),
        (reply("140°") + "<answer>140°</answer>", "140°", Score(None, False, "unparsable")),
    ],
)
def test_geoqa_strict(output, truth, expected):
    assert score_geoqa(output, truth, mode="strict") == expected


@pytest.mark.parametrize("truth", ["", "   ", None, 140])
def test_geoqa_bad_ground_truth_is_a_user_error(truth):
    with pytest.raises(SuzakError, match="ground_truth"):
        score_geoqa(reply("140°"), truth)


@pytest.mark.parametrize("scorer", [score_superclevr, score_geoqa])
def test_unknown_scoring_mode_names_the_choices(scorer):
    with pytest.raises(SuzakError, match="r1v, strict"):
        scorer(reply("4"), 4 if scorer is score_superclevr else "4", mode="lenient")


def test_score_to_dict_round_trips_fields():
    assert Score("4", False, "wrong").to_dict() == {"extracted": "4", "correct": False, "failure": "wrong"}


# ---------------------------------------------------------------- Wilson interval


@pytest.mark.parametrize(
    ("correct", "n", "lo", "hi"),
    [
        (0, 10, 0.0, 0.27754),
        (5, 10, 0.23659, 0.76341),
        (10, 10, 0.72246, 1.0),
        (165, 200, 0.76635, 0.87140),  # R1-V's 82.5% on SuperCLEVR-200
        (231, 754, 0.27450, 0.34019),  # R1-V's 30.64% on GeoQA-754
    ],
)
def test_wilson_interval_values(correct, n, lo, hi):
    got_lo, got_hi = wilson_interval(correct, n)
    assert got_lo == pytest.approx(lo, abs=1e-4)
    assert got_hi == pytest.approx(hi, abs=1e-4)


def test_wilson_interval_contains_the_estimate_and_narrows_with_n():
    lo_small, hi_small = wilson_interval(8, 10)
    lo_big, hi_big = wilson_interval(800, 1000)
    assert lo_small < 0.8 < hi_small and lo_big < 0.8 < hi_big
    assert hi_big - lo_big < hi_small - lo_small


def test_wilson_interval_wider_for_larger_z():
    lo95, hi95 = wilson_interval(30, 100)
    lo99, hi99 = wilson_interval(30, 100, z=2.576)
    assert lo99 < lo95 and hi99 > hi95


def test_wilson_interval_edge_cases():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(SuzakError, match="correct <= n"):
        wilson_interval(11, 10)
    with pytest.raises(SuzakError, match="correct <= n"):
        wilson_interval(-1, 10)
