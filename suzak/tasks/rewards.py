"""Training rewards and answer extraction: R1-V's exact rules ("r1v") and hack-resistant rules ("guarded").

Every reward has the signature `fn(completion, solution, *, answer_type="number") -> float` and returns a
value in [0, 1] for any pair of strings; it never raises on model output, because one odd completion must not
stop a training run. Look a reward up with `get_reward("accuracy", "guarded")`.

Run the tests: .venv/bin/python -m pytest tests/unit/test_rewards.py -q
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable

import math_verify.grader
import math_verify.parser
from math_verify import LatexExtractionConfig, parse, verify
from math_verify.errors import TimeoutException
from sympy import Basic, FiniteSet, Interval, MatrixBase, Tuple, Union

from suzak.errors import SuzakError

ANSWER_TYPES = ("number", "math")
MODES = ("r1v", "guarded")

# math_verify's own timeouts use SIGALRM, which only exists on the main thread; R1-V used 5 s, we use less
# because a pathological completion costs this much per comparison during training.
PARSE_TIMEOUT_S = 3
VERIFY_TIMEOUT_S = 3

# Off the main thread there is no timeout at all, so text that could make sympy run for minutes
# (power towers, huge literals, big factorials, sums/products/integrals) is not handed to math_verify.
_RISKY_WITHOUT_TIMEOUT = re.compile(
    r"\^\s*\{[^{}]*\^"  # nested exponent: 9^{9^{9}}
    r"|\^\s*\(?\s*\d+\s*\)?\s*\^\s*[({]?\s*\d"  # chained exponent: 9^9^9 (not the unit "cm^2^")
    r"|\*\*[^*]*\*\*"  # python power chain: 9**9**9
    r"|\d{40,}"  # huge literal
    r"|\d{3,}\s*!"  # big factorial
    r"|\\(?:prod|sum|int|lim)"
)
_MAX_TEXT_WITHOUT_TIMEOUT = 8000

# math_verify warns once that running without a timeout may hang; the screen above is that guard, so the
# warning would only mislead whoever reads the training log.
math_verify.parser.TIMEOUT_WARNING_SHOWN = True
math_verify.grader.TIMEOUT_WARNING_SHOWN = True

Reward = Callable[..., float]


# ---------------------------------------------------------------- math_verify wrappers


def _on_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _unsafe_without_timeout(text: str) -> bool:
    return len(text) > _MAX_TEXT_WITHOUT_TIMEOUT or _RISKY_WITHOUT_TIMEOUT.search(text) is not None


def safe_parse(text: str, *, latex_only: bool = False) -> list:
    """math_verify.parse that never raises or hangs; [] when nothing could be parsed.

    latex_only restricts extraction to LaTeX (the text is expected to be wrapped in $...$ already).
    """
    if not isinstance(text, str):
        return []
    on_main = _on_main_thread()
    if not on_main and _unsafe_without_timeout(text):
        return []
    kwargs = {"extraction_config": [LatexExtractionConfig()]} if latex_only else {}
    try:
        return parse(text, parsing_timeout=PARSE_TIMEOUT_S if on_main else None, **kwargs)
    except (Exception, TimeoutException):
        return []


def safe_verify(gold: list, target: list) -> bool:
    """math_verify.verify(gold, target) that never raises or hangs; False on any failure."""
    if not gold or not target:
        return False
    on_main = _on_main_thread()
    if not on_main and any(_unsafe_without_timeout(str(x)) for x in (*gold, *target) if isinstance(x, str)):
        return False
    try:
        return bool(verify(gold, target, timeout_seconds=VERIFY_TIMEOUT_S if on_main else None))
    except (Exception, TimeoutException):
        return False


# ---------------------------------------------------------------- tag handling

_FIRST_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def extract_answer(text: str) -> str | None:
    """Stripped content of the first <answer>...</answer> pair, or None when there is no complete pair."""
    if not isinstance(text, str):
        return None
    # Without a closing tag the lazy search fails from every opening tag: quadratic on tag spam.
    match = _FIRST_ANSWER.search(text) if "</answer>" in text else None
    return match.group(1).strip() if match else None


def count_answer_tags(text: str) -> int:
    """How many opening <answer> tags the text has (a well-formed reply has exactly one)."""
    return text.count("<answer>") if isinstance(text, str) else 0


def single_answer(text: str) -> str | None:
    """Content of the only <answer>...</answer> pair; None when the tag is missing, repeated, unclosed or empty."""
    if not isinstance(text, str):
        return None
    if text.count("<answer>") != 1 or text.count("</answer>") != 1:
        return None
    answer = extract_answer(text)
    return answer or None


def solution_answer(solution: str) -> str:
    """The gold answer of a solution given R1-V style ("<answer> 3 </answer>") or plain ("3", "140°")."""
    if not isinstance(solution, str):
        return ""
    inside = extract_answer(solution)
    return inside if inside is not None else solution.strip()


# ---------------------------------------------------------------- number answers

_NUMBER_WORDS = {
    word: value
    for value, word in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
        "fifteen sixteen seventeen eighteen nineteen twenty".split()
    )
}
# Digits only, optionally "3.0" and a sentence-ending period; anything else (several numbers, prose) is refused.
# The digit cap keeps int() clear of Python's 4300-digit conversion limit, which raises.
_INTEGER_TEXT = re.compile(r"([0-9]{1,30})(?:\.0+)?\.?")


def parse_number_answer(text: str) -> int | None:
    """The integer a short answer states ("3", " 3 ", "3.0", "3.", "three"), or None."""
    if not isinstance(text, str):
        return None
    text = text.strip()
    match = _INTEGER_TEXT.fullmatch(text)
    if match:
        return int(match.group(1))
    return _NUMBER_WORDS.get(text.rstrip(".").lower())


# ---------------------------------------------------------------- math answers

# Trailing units seen in GeoQA answers; stripping them makes the comparison one of values ("8cm" == "8").
_UNITS = (
    "平方米", "平方厘米", "厘米", "毫米", "千米", "海里", "小时", "分钟", "米", "秒", "度",
    "cm^{2}", "cm^2^", "cm^2", "cm²", "m^{2}", "m^2", "m²", "km", "cm", "mm", "m",
    "degrees", "degree", "units", "unit", "hours", "hour", "seconds", "second",
)
_TRAILING_UNIT = re.compile(
    r"(?<=[0-9}\)\sπ.])\s*(?:\\(?:text|mathrm|rm|mbox)\s*\{\s*)?(?:"
    + "|".join(re.escape(u) for u in _UNITS)
    + r")\s*\}?\s*$"
)
_DEGREE = re.compile(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|\\degree|°|º")
_DELIMITERS = re.compile(r"\$|\\\(|\\\)|\\\[|\\\]")
_UNICODE_TO_LATEX = {
    "π": r"\pi ", "×": r"\times ", "·": r"\cdot ", "÷": r"\div ", "−": "-", "∠": r"\angle ",
    "²": "^{2}", "³": "^{3}", "（": "(", "）": ")",
}
_SQRT_BRACED = re.compile(r"√\s*\{")
_SQRT_PAREN = re.compile(r"√\s*\(([^()]*)\)")
_SQRT_BARE = re.compile(r"√\s*([0-9]+(?:\.[0-9]+)?|[A-Za-z])")
_SEVERAL_ANSWERS = re.compile(r",|;|，|；|、|\bor\b|\band\b|或|\\pm|±|\\mp|∓|\\text\s*\{\s*or", re.IGNORECASE)
_SPACED_NUMBERS = re.compile(r"[0-9.]\s+[0-9]")
_MAX_MATH_ANSWER_CHARS = 200


def normalize_math_answer(text: str) -> str:
    """Rewrite a short answer into plain LaTeX: unicode roots/pi to LaTeX, degree signs and units dropped."""
    text = _DELIMITERS.sub("", text).strip()
    text = text.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    text = _DEGREE.sub("", text)
    previous = None
    while previous != text:  # "5cm^2^", "4πcm": strip units one at a time
        previous = text
        text = _TRAILING_UNIT.sub("", text).strip()
    text = _SQRT_BRACED.sub(r"\\sqrt{", text)
    text = _SQRT_PAREN.sub(r"\\sqrt{\1}", text)
    text = _SQRT_BARE.sub(r"\\sqrt{\1}", text)
    for char, latex in _UNICODE_TO_LATEX.items():
        text = text.replace(char, latex)
    return text.strip().rstrip(".").strip()


def has_several_answers(text: str) -> bool:
    """True for answers that hedge between candidates: "3, 4", "3 or 4", "3 4", "±2", "140° 40°"."""
    if _SEVERAL_ANSWERS.search(text):
        return True
    return _SPACED_NUMBERS.search(_DEGREE.sub(" ", text)) is not None


def _is_collection(value: object) -> bool:
    return isinstance(value, (FiniteSet, Tuple, Interval, Union, MatrixBase, list, tuple, set))


def _parse_normalized(text: str) -> list:
    """Parse a normalised answer as one LaTeX expression; [] when it is not one value."""
    parsed = safe_parse(f"${text}$", latex_only=True)
    sympy_values = [p for p in parsed if isinstance(p, (Basic, MatrixBase))]
    if not sympy_values or any(_is_collection(v) for v in sympy_values):
        return []
    return parsed


def _screen_math_answer(answer: str) -> str | None:
    """The normalised answer, or None for text no single real answer looks like."""
    # No real answer is long or a power tower, and refusing them here spares a multi-second timeout.
    if len(answer) > _MAX_MATH_ANSWER_CHARS or _unsafe_without_timeout(answer) or has_several_answers(answer):
        return None
    return normalize_math_answer(answer) or None


def parse_math_answer(answer: str) -> list:
    """math_verify values of one short answer ("140°", "2√{3}", "\\frac{12}{5}"); [] when it is not one value."""
    if not isinstance(answer, str):
        return []
    normalized = _screen_math_answer(answer)
    return _parse_normalized(normalized) if normalized else []


def math_answers_match(answer: str, gold: str) -> bool:
    """Whether one extracted answer equals the gold answer in value ("140°" == "140", "\\frac{12}{5}" == "2.4")."""
    if not isinstance(answer, str) or not isinstance(gold, str):
        return False
    answer_norm, gold_norm = _screen_math_answer(answer), normalize_math_answer(gold)
    if not answer_norm or not gold_norm:
        return False
    # Letters (multiple-choice options) and other non-numeric answers compare as text.
    if answer_norm.casefold() == gold_norm.casefold():
        return True
    return safe_verify(_parse_normalized(gold_norm), _parse_normalized(answer_norm))


# ---------------------------------------------------------------- r1v rewards (R1-V's grpo.py, rule for rule)

_R1V_ANSWER = re.compile(r"<answer>(.*?)</answer>")  # no DOTALL, as in R1-V
_R1V_FORMAT = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)


def r1v_accuracy(completion: str, solution: str, *, answer_type: str = "number") -> float:
    """R1-V's accuracy: math_verify on the whole texts, else exact match of the <answer> contents.

    R1-V calls verify(parse(completion), parse(solution)): the completion sits in math_verify's gold slot.
    answer_type is accepted for a uniform signature; R1-V used the same rule for every task.
    """
    _check_answer_type(answer_type)
    if not isinstance(completion, str) or not isinstance(solution, str):
        return 0.0
    if safe_verify(safe_parse(completion), safe_parse(solution)):
        return 1.0
    sol_match = _R1V_ANSWER.search(solution)
    ground_truth = sol_match.group(1).strip() if sol_match else solution.strip()
    content_match = _R1V_ANSWER.search(completion) if "</answer>" in completion else None
    student_answer = content_match.group(1).strip() if content_match else completion.strip()
    return 1.0 if student_answer == ground_truth else 0.0


def r1v_format(completion: str, solution: str = "", *, answer_type: str = "number") -> float:
    """R1-V's format: the whole completion is <think>...</think> then <answer>...</answer>."""
    _check_answer_type(answer_type)
    if not isinstance(completion, str):
        return 0.0
    return 1.0 if _R1V_FORMAT.fullmatch(completion) else 0.0


# ---------------------------------------------------------------- guarded rewards

_GUARDED_FORMAT = re.compile(r"\s*<think>.*?</think>\s*<answer>(.*?)</answer>\s*", re.DOTALL)
_TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def guarded_accuracy(completion: str, solution: str, *, answer_type: str = "number") -> float:
    """1.0 only when the single <answer> pair holds exactly one answer equal to the solution's.

    Zero for a missing, empty or repeated tag, several candidates in one tag, or the answer only outside the tag.
    """
    _check_answer_type(answer_type)
    answer = single_answer(completion)
    if answer is None:
        return 0.0
    gold = solution_answer(solution)
    if answer_type == "number":
        value = parse_number_answer(answer)
        return 1.0 if value is not None and value == parse_number_answer(gold) else 0.0
    return 1.0 if math_answers_match(answer, gold) else 0.0


def guarded_format(completion: str, solution: str = "", *, answer_type: str = "number") -> float:
    """1.0 for exactly one <think>...</think> followed by exactly one non-empty <answer>...</answer>, nothing after."""
    _check_answer_type(answer_type)
    if not isinstance(completion, str):
        return 0.0
    if any(completion.count(tag) != 1 for tag in _TAGS):
        return 0.0
    match = _GUARDED_FORMAT.fullmatch(completion)
    return 1.0 if match and match.group(1).strip() else 0.0


# ---------------------------------------------------------------- registry

REWARDS: dict[str, Reward] = {
    "r1v_accuracy": r1v_accuracy,
    "r1v_format": r1v_format,
    "guarded_accuracy": guarded_accuracy,
    "guarded_format": guarded_format,
}


def get_reward(name: str, mode: str = "guarded") -> Reward:
    """The reward function `name` ("accuracy" or "format") under rules `mode` ("guarded" or "r1v")."""
    if mode not in MODES:
        raise SuzakError(f"grpo.reward_mode: unknown reward mode {mode!r}; use one of {', '.join(MODES)}.")
    key = f"{mode}_{name}"
    if key not in REWARDS:
        names = sorted({k.split("_", 1)[1] for k in REWARDS})
        raise SuzakError(
            f"grpo.reward_weights: unknown reward {name!r}; use one of {', '.join(names)}."
        )
    return REWARDS[key]


def _check_answer_type(answer_type: str) -> None:
    # A typo here would silently zero every reward for a whole run, so it is the one input that raises.
    if answer_type not in ANSWER_TYPES:
        raise SuzakError(f"answer_type {answer_type!r} is not known; use one of {', '.join(ANSWER_TYPES)}.")
