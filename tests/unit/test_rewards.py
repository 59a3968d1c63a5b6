"""Tests of suzak.tasks.rewards: R1-V's exact reward rules, the guarded rules and their hack guards, fuzzing.

Run: .venv/bin/python -m pytest tests/unit/test_rewards.py -q
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from suzak.errors import SuzakError
from suzak.tasks import rewards
from suzak.tasks.rewards import (
    REWARDS,
    count_answer_tags,
    extract_answer,
    get_reward,
    guarded_accuracy,
    guarded_format,
    has_several_answers,
    math_answers_match,
    normalize_math_answer,
    parse_math_answer,
    parse_number_answer,
    r1v_accuracy,
    r1v_format,
    single_answer,
    solution_answer,
)


def reply(answer: str, think: str = "I count the objects.") -> str:
    return f"<think>{think}</think><answer>{answer}</answer>"


# ---------------------------------------------------------------- tag helpers


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<answer> 3 </answer>", "3"),
        ("<think>a</think><answer>\n140°\n</answer>", "140°"),
        ("<answer>2</answer><answer>3</answer>", "2"),  # first pair
        ("<answer></answer>", ""),
        ("<answer>3", None),
        ("no tags at all", None),
    ],
)
def test_extract_answer_takes_first_complete_pair(text, expected):
    assert extract_answer(text) == expected


def test_count_answer_tags_counts_opening_tags():
    assert count_answer_tags("none") == 0
    assert count_answer_tags(reply("3")) == 1
    assert count_answer_tags("<answer>2</answer><answer>3</answer>") == 2


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (reply(" 3 "), "3"),
        (reply(""), None),
        (reply("   "), None),
        ("<answer>2</answer><answer>3</answer>", None),
        ("<answer>2</answer></answer>", None),
        ("<answer>3", None),
        ("</answer>3<answer>", None),
    ],
)
def test_single_answer_refuses_missing_repeated_and_empty_tags(text, expected):
    assert single_answer(text) == expected


@pytest.mark.parametrize(
    ("solution", "expected"),
    [
        ("<answer> 3 </answer>", "3"),
        ("3", "3"),
        (" 140° ", "140°"),
        ("<answer>\\frac{12}{5}</answer>", "\\frac{12}{5}"),
    ],
)
def test_solution_answer_normalises_both_solution_styles(solution, expected):
    assert solution_answer(solution) == expected


# ---------------------------------------------------------------- r1v rules


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        (reply("3"), 1.0),
        ("<think>\nmulti\nline\n</think>\n\n<answer>3</answer>", 1.0),
        ("<think></think><answer></answer>", 1.0),  # R1-V does not ask for content
        ("<think>a</think><answer>1</answer><answer>2</answer>", 1.0),  # .*? stretches over both tags
        (" " + reply("3"), 0.0),
        (reply("3") + " done", 0.0),
        ("<answer>3</answer>", 0.0),
        ("<answer>3</answer><think>a</think>", 0.0),
    ],
)
def test_r1v_format_is_a_fullmatch(completion, expected):
    assert r1v_format(completion) == expected


def test_r1v_accuracy_uses_math_verify_first():
    assert r1v_accuracy(reply(" 3 "), "<answer> 3 </answer>") == 1.0
    assert r1v_accuracy(reply(" \\frac{12}{5} "), "2.4", answer_type="math") == 1.0
    assert r1v_accuracy(reply(" 4 "), "<answer> 3 </answer>") == 0.0


def test_r1v_accuracy_passes_completion_in_math_verifys_gold_slot(monkeypatch):
    # R1-V's grpo.py: verify(parse(content), parse(sol)). The order matters to math_verify (it is not symmetric).
    calls = []

    def recording_verify(gold, target, **kwargs):
        calls.append((gold, target))
        return False

    monkeypatch.setattr(rewards, "verify", recording_verify)
    r1v_accuracy("The value is 7", "<answer> 5 </answer>")
    assert calls and calls[0][0][0] == 7 and calls[0][1][0] == 5


def test_r1v_accuracy_falls_back_to_exact_text_of_answer_tags():
    # math_verify finds nothing in a letter, so the tag contents are compared as text.
    assert r1v_accuracy(reply("B"), "<answer> B </answer>") == 1.0
    assert r1v_accuracy("B", "B") == 1.0
    assert r1v_accuracy(reply("b"), "<answer> B </answer>") == 0.0
    # R1-V's tag regex has no DOTALL: a multi-line answer falls back to the whole completion, which differs.
    assert r1v_accuracy("<answer>\nB\n</answer>", "<answer>B</answer>") == 0.0


# ---------------------------------------------------------------- number answers


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("3", 3), (" 3 ", 3), ("3.0", 3), ("3.", 3), ("03", 3), ("10", 10), ("three", 3), ("Three.", 3),
        ("twenty", 20), ("3.5", None), ("3 4", None), ("3, 4", None), ("3 or 4", None), ("-3", None),
        ("$3$", None), ("about 3", None), ("", None), ("three or four", None),
    ],
)
def test_parse_number_answer_accepts_one_integer_only(text, expected):
    assert parse_number_answer(text) == expected


def test_guarded_number_accuracy_compares_as_int():
    assert guarded_accuracy(reply("3"), "<answer> 3 </answer>") == 1.0
    assert guarded_accuracy(reply(" 3.0 "), "3") == 1.0
    assert guarded_accuracy(reply("three"), "<answer> 3 </answer>") == 1.0
    assert guarded_accuracy(reply("4"), "<answer> 3 </answer>") == 0.0
    assert guarded_accuracy(reply("3"), "not a number") == 0.0


# ---------------------------------------------------------------- math answers

EQUAL_MATH = [
    ("140°", "140"),
    ("140^\\circ", "140°"),
    ("140^{\\circ}", "<answer>140°</answer>"),
    ("$140^\\circ$", "140°"),
    ("140 degrees", "140°"),
    ("\\frac{12}{5}", "2.4"),
    ("2.4", "\\frac{12}{5}"),
    ("\\dfrac{12}{5}", "2.4"),
    ("12/5", "\\frac{12}{5}"),
    ("√3", "√{3}"),
    ("\\sqrt{3}", "√{3}"),
    ("2√3", "2√{3}"),
    ("\\frac{\\sqrt{3}}{2}", "\\frac{√{3}}{2}"),
    ("4\\pi", "4πcm"),
    ("\\frac{\\pi}{6}", "\\frac{1}{6}π"),
    ("9\\pi", "9πcm^{2}"),
    ("1+\\sqrt{3}", "(√{3}+1)小时"),
    ("10.2", "10.2米"),
    ("8 cm", "8cm"),
    ("5", "5cm^2^"),
    ("0.5", "\\frac{1}{2}"),
    ("2\\sqrt{2}-2", "2√{2}-2"),
    ("x=3", "3"),
    ("∠CED = 140°", "140°"),
    ("\\boxed{140}", "140°"),
    ("A", "A"),
    ("a", "A"),
]
DIFFERENT_MATH = [
    ("2\\sqrt{3}", "2"),
    ("2", "2√{3}"),
    ("4", "4π"),
    ("40", "140°"),
    ("B", "A"),
    ("2.5", "\\frac{12}{5}"),
]


@pytest.mark.parametrize(("answer", "solution"), EQUAL_MATH)
def test_guarded_math_accuracy_compares_values(answer, solution):
    assert guarded_accuracy(reply(answer), solution, answer_type="math") == 1.0


@pytest.mark.parametrize(("answer", "solution"), DIFFERENT_MATH)
def test_guarded_math_accuracy_rejects_other_values(answer, solution):
    assert guarded_accuracy(reply(answer), solution, answer_type="math") == 0.0


# Ground-truth spellings from R1-V's geoqa_test_prompts.jsonl, units and all.
GEOQA_GOLDS = [
    "140°", "\\frac{12}{5}", "√{3}", "2√{15}米", "\\frac{1}{2}cm²", "240πcm^{2}", "5cm^2^", "(√{3}+1)小时",
    "\\frac{10√{3}}{3}m", "16π平方米", "6√{3}海里", "2√{2}-2", "17.5°", "6.00米", "3.6秒", "8厘米", "π",
]


@pytest.mark.parametrize("gold", GEOQA_GOLDS)
def test_geoqa_gold_spellings_parse_to_one_value_and_match_themselves(gold):
    assert parse_math_answer(gold) != []
    assert guarded_accuracy(reply(gold), gold, answer_type="math") == 1.0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2√{3}cm", "2\\sqrt{3}"),
        ("140^{\\circ}", "140"),
        ("$\\dfrac{1}{2}$", "\\frac{1}{2}"),
        ("9π平方米", "9\\pi"),
    ],
)
def test_normalize_math_answer(text, expected):
    assert normalize_math_answer(text) == expected


@pytest.mark.parametrize(
    "text", ["3, 4", "3 or 4", "3 4", "140° 40°", "\\pm 2", "±2", "3或4", "3; 4", "3 \\text{ or } 4", "3 and 4"]
)
def test_has_several_answers(text):
    assert has_several_answers(text)
    assert parse_math_answer(text) == []


@pytest.mark.parametrize("text", ["140°", "\\frac{12}{5}", "2√{3}", "x = 3", "12/5"])
def test_single_answers_are_not_flagged(text):
    assert not has_several_answers(text)
    assert parse_math_answer(text) != []


def test_math_answer_that_parses_as_a_set_is_refused():
    assert not math_answers_match("\\{3\\}\\cup\\{4\\}", "3")


def test_guarded_math_passes_solution_in_gold_slot(monkeypatch):
    calls = []
    real_verify = rewards.verify

    def recording_verify(gold, target, **kwargs):
        calls.append((gold, target))
        return real_verify(gold, target, **kwargs)

    monkeypatch.setattr(rewards, "verify", recording_verify)
    assert guarded_accuracy(reply("\\frac{12}{5}"), "2.4", answer_type="math") == 1.0
    assert calls and float(calls[0][0][0]) == pytest.approx(2.4) and str(calls[0][1][1]) == "\\frac{12}{5}"


# ---------------------------------------------------------------- hack guards, both modes

HACKS = {
    # name: (completion, solution, answer_type, r1v accuracy, guarded accuracy)
    "empty answer, number in reasoning": (reply("", think="The count is 3"), "<answer> 3 </answer>", "number", 1, 0),
    "empty answer, math": (reply("", think="The angle is 140°"), "140°", "math", 1.0, 0.0),
    "several answers, comma": (reply("3, 4"), "<answer> 4 </answer>", "number", 1.0, 0.0),
    "several answers, or": (reply("3 or 4"), "4", "math", 1.0, 0.0),
    "several answers, space": (reply("3 4"), "4", "math", 1.0, 0.0),
    "several answers, degrees": (reply("140° 40°"), "40°", "math", 1.0, 0.0),
    "answer only outside tags": ("<think>I count 3.</think> The answer is 3", "<answer> 3 </answer>", "number", 1, 0),
    "answer outside tags, math": ("<think>x</think>The answer is 140°", "140°", "math", 1.0, 0.0),
    "repeated tags, number": (reply("2") + "<answer>3</answer>", "<answer> 3 </answer>", "number", 0.0, 0.0),
    "repeated tags, same answer": (reply("3") + "<answer>3</answer>", "<answer> 3 </answer>", "number", 1.0, 0.0),
}


@pytest.mark.parametrize("case", HACKS.values(), ids=HACKS.keys())
def test_reward_hacks_pay_under_r1v_and_not_under_guarded(case):
    completion, solution, answer_type, r1v_expected, guarded_expected = case
    assert r1v_accuracy(completion, solution, answer_type=answer_type) == r1v_expected
    assert guarded_accuracy(completion, solution, answer_type=answer_type) == guarded_expected


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        (reply("3"), 1.0),
        ("\n" + reply("3") + "\n", 1.0),
        ("<think>a</think>\n\n<answer> 140° </answer>", 1.0),
        (reply(""), 0.0),
        (reply("  "), 0.0),
        (reply("3") + " so 3", 0.0),
        (reply("3") + "<answer>3</answer>", 0.0),
        ("<think>a</think><think>b</think><answer>3</answer>", 0.0),
        ("<think>a <answer>3</answer></think><answer>3</answer>", 0.0),
        ("<answer>3</answer>", 0.0),
        ("<think>a</think>", 0.0),
        ("text <think>a</think><answer>3</answer>", 0.0),
    ],
)
def test_guarded_format(completion, expected):
    assert guarded_format(completion) == expected


# ---------------------------------------------------------------- registry and errors


def test_get_reward_looks_up_by_name_and_mode():
    assert get_reward("accuracy") is guarded_accuracy
    assert get_reward("format", "guarded") is guarded_format
    assert get_reward("accuracy", "r1v") is r1v_accuracy
    assert get_reward("format", "r1v") is r1v_format
    assert set(REWARDS) == {"r1v_accuracy", "r1v_format", "guarded_accuracy", "guarded_format"}


def test_get_reward_names_the_choices_on_bad_input():
    with pytest.raises(SuzakError, match="r1v, guarded"):
        get_reward("accuracy", "lenient")
    with pytest.raises(SuzakError, match="accuracy, format"):
        get_reward("length", "r1v")


@pytest.mark.parametrize("reward", REWARDS.values(), ids=REWARDS.keys())
def test_unknown_answer_type_raises_instead_of_silently_scoring_zero(reward):
    with pytest.raises(SuzakError, match="number, math"):
        reward(reply("3"), "3", answer_type="integer")


# ---------------------------------------------------------------- robustness


def test_rewards_off_the_main_thread_match_the_main_thread():
    # math_verify's SIGALRM timeout only works on the main thread; elsewhere it must still give the same result.
    cases = [
        (reply("\\frac{12}{5}"), "2.4", "math"),
        (reply("140°"), "140", "math"),
        (reply("3"), "<answer> 3 </answer>", "number"),
        (reply("3 or 4"), "4", "math"),
        ("The value is $x = 3$", "3", "math"),
    ]

    def run_all(case):
        completion, solution, answer_type = case
        return [fn(completion, solution, answer_type=answer_type) for fn in REWARDS.values()]

    on_main = [run_all(c) for c in cases]
    with ThreadPoolExecutor(max_workers=2) as pool:
        off_main = list(pool.map(run_all, cases))
    assert off_main == on_main


def test_power_towers_are_refused_quickly_by_guarded_rewards():
    start = time.monotonic()
    assert guarded_accuracy(reply("9^{9^{9^{9}}}"), "3", answer_type="math") == 0.0
    assert guarded_accuracy(reply("10**10**10"), "3", answer_type="math") == 0.0
    assert time.monotonic() - start < 2.0


def test_r1v_accuracy_survives_a_power_tower_within_the_timeout():
    start = time.monotonic()
    assert r1v_accuracy("The answer is $10^{10^{10}}$", "3", answer_type="math") == 0.0
    assert time.monotonic() - start < 4 * rewards.VERIFY_TIMEOUT_S + 2 * rewards.PARSE_TIMEOUT_S


def test_huge_and_spammy_inputs_score_zero_quickly():
    # int() raises past 4300 digits, and tag spam without a closing tag is the regex worst case.
    start = time.monotonic()
    for completion in [reply("9" * 5000), "9" * 5000, "<answer>" * 3000, reply("3" + " " * 5000 + "m")]:
        for fn in REWARDS.values():
            for answer_type in ("number", "math"):
                assert fn(completion, "<answer> 3 </answer>", answer_type=answer_type) in (0.0, 1.0)
    assert parse_number_answer("9" * 5000) is None
    assert time.monotonic() - start < 10.0


def test_non_string_inputs_score_zero():
    for fn in REWARDS.values():
        assert fn(None, "3") == 0.0  # type: ignore[arg-type]
        assert fn(reply("3"), None) in (0.0, 1.0)  # type: ignore[arg-type]  # format ignores the solution


FRAGMENTS = [
    "<think>", "</think>", "<answer>", "</answer>", "<answer", "answer>", " ", "\n", "3", "3.0", "three", "-",
    "140°", "^\\circ", "\\frac{12}{5}", "\\frac{", "}", "{", "$", "\\sqrt{3}", "√", "π", "cm", "米", ",", " or ",
    "x=", "\\boxed{", "\\", "^", "2", "(", ")", "A", "\\{", "\\}", "\\pm", "0.", "e", "=",
]
structured_text = st.lists(st.sampled_from(FRAGMENTS), max_size=25).map("".join)
any_text = st.one_of(st.text(max_size=200), structured_text)
FUZZ = settings(
    max_examples=120,
    deadline=timedelta(seconds=20),  # a single math_verify timeout is 3 s; a hang would blow far past this
    suppress_health_check=[HealthCheck.too_slow],
    database=None,
)


@FUZZ
@given(completion=any_text, solution=any_text, answer_type=st.sampled_from(["number", "math"]))
def test_every_reward_returns_a_float_in_unit_interval(completion, solution, answer_type):
    for fn in REWARDS.values():
        value = fn(completion, solution, answer_type=answer_type)
        assert isinstance(value, float) and 0.0 <= value <= 1.0


@FUZZ
@given(answer=structured_text, solution=st.sampled_from(["<answer> 3 </answer>", "140°", "\\frac{12}{5}", "2√{3}"]))
def test_well_formed_replies_never_raise_and_guarded_never_exceeds_r1v_format(answer, solution):
    completion = reply(answer)
    for answer_type in ("number", "math"):
        assert guarded_accuracy(completion, solution, answer_type=answer_type) in (0.0, 1.0)
    # guarded format is strictly tighter than R1-V's.
    assert guarded_format(completion) <= r1v_format(completion)
