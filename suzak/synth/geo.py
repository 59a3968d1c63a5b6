"""GeoQA-style geometry problems: a labelled diagram, a multiple-choice question and a worked solution.

Templates cover triangle angle sums, isosceles and exterior angles, parallel lines cut by a transversal,
inscribed/central angles, diameters, radii-isosceles chords, intersecting lines, Pythagoras and the altitude
on the hypotenuse. Each builds real coordinates first, so the diagram is to scale and the answer can be
re-measured from meta["points"]. Question wording and "Choices:" follow GeoQA; the answer is the value
("140°", "5", "\\frac{12}{5}") like R1-V's geoqa_test_prompts ground_truth. Deterministic per (seed, i).

    python -m suzak.synth.geo --seed 0 --index 2 --out /tmp/geo.png
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from fractions import Fraction
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from suzak.errors import SuzakError
from suzak.synth.sample import SynthSample

_KIND_TAG = 0x6E0  # keeps geo and clevr random streams apart for the same (seed, i)
_SS = 2  # supersampling for anti-aliased lines
LETTERS = "ABCD"


@dataclass
class Figure:
    """Diagram in problem units (y up); the renderer scales it to fit the image."""

    points: dict[str, np.ndarray]
    segments: list[tuple[str, str]] = field(default_factory=list)
    circles: list[tuple[str, float]] = field(default_factory=list)
    angle_marks: list[tuple[str, str, str, str]] = field(default_factory=list)  # vertex, arm, arm, text
    right_marks: list[tuple[str, str, str]] = field(default_factory=list)
    ticks: list[tuple[str, str]] = field(default_factory=list)  # equal-length marks


@dataclass
class GeoProblem:
    figure: Figure
    stem: str  # GeoQA-style question ending in "()"
    answer: Fraction
    unit: str  # "°" or ""
    steps: list[str]
    distractors: list[Fraction]
    asked: dict
    given: dict
    extra_meta: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ helpers
def _pt(x: float, y: float) -> np.ndarray:
    return np.array([x, y], dtype=float)


def _on_circle(center: np.ndarray, radius: float, degrees: float) -> np.ndarray:
    return center + radius * _pt(math.cos(math.radians(degrees)), math.sin(math.radians(degrees)))


def measure_angle(points: dict, vertex: str, arm1: str, arm2: str) -> float:
    """Angle arm1-vertex-arm2 in degrees, from coordinates (used by the tests as the ground truth check)."""
    u = np.asarray(points[arm1], float) - np.asarray(points[vertex], float)
    v = np.asarray(points[arm2], float) - np.asarray(points[vertex], float)
    cos = float(u @ v) / (np.linalg.norm(u) * np.linalg.norm(v))
    return math.degrees(math.acos(max(-1.0, min(1.0, cos))))


def format_value(value: Fraction, unit: str) -> str:
    """GeoQA answer text: "40°", "5", or "\\frac{12}{5}"."""
    if value.denominator == 1:
        return f"{value.numerator}{unit}"
    return f"\\frac{{{value.numerator}}}{{{value.denominator}}}{unit}"


def _given(value: float) -> str:
    """GeoQA writes given quantities as floats: "angle A = 80.0"."""
    return f"{float(value):.1f}"


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _multiple_of_5(rng: np.random.Generator, low: int, high: int) -> int:
    return 5 * int(rng.integers(low // 5, high // 5 + 1))


def _triangle_from_angles(angle_b: float, angle_c: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A, B, C with BC = 1 on the x axis and the given base angles (law of sines for AB)."""
    angle_a = 180.0 - angle_b - angle_c
    ab = math.sin(math.radians(angle_c)) / math.sin(math.radians(angle_a))
    a = _pt(ab * math.cos(math.radians(angle_b)), ab * math.sin(math.radians(angle_b)))
    return a, _pt(0, 0), _pt(1, 0)


def _angle_q(vertex: str, arm1: str, arm2: str) -> dict:
    return {"type": "angle", "vertex": vertex, "arms": [arm1, arm2]}


# ---------------------------------------------------------------------------------------------- templates
def triangle_angle_sum(rng: np.random.Generator) -> GeoProblem:
    a = _multiple_of_5(rng, 30, 110)
    b = _multiple_of_5(rng, 25, 150 - a)
    angles = {"A": a, "B": b, "C": 180 - a - b}
    pa, pb, pc = _triangle_from_angles(b, angles["C"])
    asked = _pick(rng, "ABC")
    g1, g2 = [v for v in "ABC" if v != asked]
    ans = angles[asked]
    fig = Figure({"A": pa, "B": pb, "C": pc}, [("A", "B"), ("B", "C"), ("C", "A")])
    return GeoProblem(
        fig,
        f"As shown in the figure, in triangle ABC, angle {g1} = {_given(angles[g1])}, angle {g2} = "
        f"{_given(angles[g2])}, then the degree of angle {asked} is ()",
        Fraction(ans),
        "°",
        [
            "The three interior angles of a triangle add up to 180°.",
            f"In triangle ABC, angle {asked} = 180° - angle {g1} - angle {g2} = 180° - {angles[g1]}° - "
            f"{angles[g2]}° = {ans}°.",
        ],
        [Fraction(180 - ans), Fraction(ans + 10), Fraction(ans - 10), Fraction(2 * ans)],
        _angle_q(asked, g1, g2),
        {f"angle {g1}": angles[g1], f"angle {g2}": angles[g2]},
        {"triangle_angles": angles},
    )


def isosceles(rng: np.random.Generator) -> GeoProblem:
    base = _multiple_of_5(rng, 25, 80)
    apex = 180 - 2 * base  # even, so the base angle is a whole number when it is the unknown
    pa = _pt(0, math.tan(math.radians(base)))
    fig = Figure({"A": pa, "B": _pt(-1, 0), "C": _pt(1, 0)}, [("A", "B"), ("B", "C"), ("C", "A")])
    fig.ticks = [("A", "B"), ("A", "C")]
    angles = {"A": apex, "B": base, "C": base}
    if rng.random() < 0.5:
        stem_given, asked, ans = f"angle A = {_given(apex)}", _angle_q("B", "A", "C"), base
        steps = [
            "Since AB = AC, triangle ABC is isosceles, so angle B = angle C.",
            f"The angles of a triangle add up to 180°, so angle B = (180° - {apex}°) ÷ 2 = {base}°.",
        ]
        name, given = "B", {"angle A": apex}
    else:
        stem_given, asked, ans = f"angle B = {_given(base)}", _angle_q("A", "B", "C"), apex
        steps = [
            f"Since AB = AC, triangle ABC is isosceles, so angle C = angle B = {base}°.",
            f"The angles of a triangle add up to 180°, so angle A = 180° - 2 × {base}° = {apex}°.",
        ]
        name, given = "A", {"angle B": base}
    return GeoProblem(
        fig,
        f"As shown in the figure, in triangle ABC, AB = AC, {stem_given}, then the degree of angle {name} is ()",
        Fraction(ans),
        "°",
        steps,
        [Fraction(180 - ans), Fraction(180 - 2 * ans), Fraction(90 - ans), Fraction(ans + 10)],
        asked,
        given,
        {"triangle_angles": angles},
    )


def exterior_angle(rng: np.random.Generator) -> GeoProblem:
    a = _multiple_of_5(rng, 30, 100)
    b = _multiple_of_5(rng, 25, 145 - a)
    c = 180 - a - b
    pa, pb, pc = _triangle_from_angles(b, c)
    fig = Figure({"A": pa, "B": pb, "C": pc, "D": _pt(1.55, 0)}, [("A", "B"), ("B", "D"), ("C", "A")])
    ans = a + b
    return GeoProblem(
        fig,
        f"As shown in the figure, in triangle ABC, point D is on the extension of BC, angle A = {_given(a)}, "
        f"angle B = {_given(b)}, then the degree of angle ACD is ()",
        Fraction(ans),
        "°",
        [
            f"In triangle ABC, angle ACB = 180° - {a}° - {b}° = {c}°.",
            f"B, C and D lie on one line, so angle ACD = 180° - angle ACB = 180° - {c}° = {ans}°,",
            "which is the sum of the two remote interior angles A and B.",
        ],
        [Fraction(c), Fraction(180 - a), Fraction(ans + 10), Fraction(ans - 10)],
        _angle_q("C", "A", "D"),
        {"angle A": a, "angle B": b},
        {"triangle_angles": {"A": a, "B": b, "C": c}},
    )


# Angles at the two crossings of a transversal: name -> (vertex, arm, arm, equals theta?).
_AT_E = {"GEB": ("E", "G", "B", True), "AEF": ("E", "A", "F", True), "AEG": ("E", "A", "G", False),
         "BEF": ("E", "B", "F", False)}  # fmt: skip
_AT_F = {"EFD": ("F", "E", "D", True), "CFH": ("F", "C", "H", True), "CFE": ("F", "C", "E", False),
         "DFH": ("F", "D", "H", False)}  # fmt: skip


def parallel_lines(rng: np.random.Generator) -> GeoProblem:
    theta = _pick(rng, [t for t in range(35, 150, 5) if t != 90])
    u = _pt(math.cos(math.radians(theta)), math.sin(math.radians(theta)))
    pe = _pt(rng.uniform(-0.3, 0.3), 1.0)
    pf = pe - u / u[1]
    pts = {"A": _pt(-1.6, 1), "B": _pt(1.6, 1), "C": _pt(-1.6, 0), "D": _pt(1.6, 0), "E": pe, "F": pf,
           "G": pe + 0.55 * u / u[1], "H": pf - 0.55 * u / u[1]}  # fmt: skip
    n1, n2 = _pick(rng, list(_AT_E)), _pick(rng, list(_AT_F))
    v1 = theta if _AT_E[n1][3] else 180 - theta
    ans = theta if _AT_F[n2][3] else 180 - theta
    fig = Figure(pts, [("A", "B"), ("C", "D"), ("G", "H")])
    fig.angle_marks = [(*_AT_E[n1][:3], "1"), (*_AT_F[n2][:3], "2")]
    steps = [f"Angle 1 is angle {n1} = {v1}°."]
    if n1 == "AEF":
        steps.append(f"Angle GEB = angle AEF = {theta}° (vertical angles).")
    elif n1 != "GEB":
        steps.append(f"Angle GEB = 180° - {v1}° = {theta}° (angles on a straight line).")
    steps.append(f"Since AB ∥ CD, angle EFD = angle GEB = {theta}° (corresponding angles).")
    if n2 == "EFD":
        steps.append(f"Angle 2 is angle EFD, so angle 2 = {theta}°.")
    elif n2 == "CFH":
        steps.append(f"Angle 2 is angle CFH = angle EFD = {theta}° (vertical angles).")
    else:
        steps.append(f"Angle 2 is angle {n2} = 180° - {theta}° = {ans}° (angles on a straight line).")
    return GeoProblem(
        fig,
        f"As shown in the figure, AB ∥ CD, line GH intersects AB and CD at points E and F, angle 1 = {_given(v1)}, "
        "then the degree of angle 2 is ()",
        Fraction(ans),
        "°",
        steps,
        [Fraction(180 - ans), Fraction(ans - 20), Fraction(ans + 10), Fraction(ans - 10)],
        _angle_q(*_AT_F[n2][:3]),
        {"angle 1": v1, "angle 1 is": n1, "angle 2 is": n2},
    )


def _major_arc_point(rng: np.random.Generator, start: float, span: float) -> float:
    """Direction (degrees) of a point on the major arc, kept clear of the chord's ends."""
    return start + span + 30 + rng.uniform(0, 360 - span - 60)


def inscribed_angle(rng: np.random.Generator) -> GeoProblem:
    half = _multiple_of_5(rng, 20, 80)
    start = rng.uniform(200, 340) - half
    pts = {"O": _pt(0, 0), "A": _on_circle(_pt(0, 0), 1, start), "B": _on_circle(_pt(0, 0), 1, start + 2 * half)}
    pts["C"] = _on_circle(_pt(0, 0), 1, _major_arc_point(rng, start, 2 * half))
    fig = Figure(pts, [("O", "A"), ("O", "B"), ("C", "A"), ("C", "B")], [("O", 1.0)])
    if rng.random() < 0.5:
        given, asked, ans = ("angle AOB", 2 * half), _angle_q("C", "A", "B"), half
        steps = ["Angle ACB is an inscribed angle and angle AOB is the central angle on the same arc AB,",
                 f"so angle ACB = 1/2 × angle AOB = 1/2 × {2 * half}° = {half}°."]  # fmt: skip
        target = "ACB"
    else:
        given, asked, ans = ("angle ACB", half), _angle_q("O", "A", "B"), 2 * half
        steps = ["Angle AOB is the central angle and angle ACB is an inscribed angle on the same arc AB,",
                 f"so angle AOB = 2 × angle ACB = 2 × {half}° = {2 * half}°."]  # fmt: skip
        target = "AOB"
    return GeoProblem(
        fig,
        f"As shown in the figure, points A, B and C are on circle O, {given[0]} = {_given(given[1])}, "
        f"then the degree of angle {target} is ()",
        Fraction(ans),
        "°",
        steps,
        [Fraction(180 - ans), Fraction(ans * 2 if ans < 90 else ans // 2), Fraction(90 - ans), Fraction(ans + 10)],
        asked,
        {given[0]: given[1]},
    )


def diameter_right_angle(rng: np.random.Generator) -> GeoProblem:
    x = _multiple_of_5(rng, 20, 70)
    o = _pt(0, 0)
    pts = {"O": o, "A": _pt(-1, 0), "B": _pt(1, 0), "C": _on_circle(o, 1, 2 * x)}
    fig = Figure(pts, [("A", "B"), ("A", "C"), ("B", "C")], [("O", 1.0)])
    ans = 90 - x
    return GeoProblem(
        fig,
        f"As shown in the figure, AB is the diameter of circle O, point C is on circle O, angle BAC = {_given(x)}, "
        "then the degree of angle ABC is ()",
        Fraction(ans),
        "°",
        [
            "Since AB is a diameter, the inscribed angle it subtends is a right angle: angle ACB = 90°.",
            f"In triangle ABC, angle ABC = 180° - 90° - {x}° = {ans}°.",
        ],
        [Fraction(x), Fraction(180 - 2 * x) if 180 - 2 * x != ans else Fraction(ans + 20), Fraction(90 + x),
         Fraction(ans + 10)],  # fmt: skip
        _angle_q("B", "A", "C"),
        {"angle BAC": x},
        {"triangle_angles": {"A": x, "B": ans, "C": 90}},
    )


def radius_isosceles(rng: np.random.Generator) -> GeoProblem:
    x = _multiple_of_5(rng, 20, 70)
    central = 180 - 2 * x
    start = rng.uniform(200, 340) - central / 2
    o = _pt(0, 0)
    pts = {"O": o, "A": _on_circle(o, 1, start), "B": _on_circle(o, 1, start + central)}
    pts["C"] = _on_circle(o, 1, _major_arc_point(rng, start, central))
    fig = Figure(pts, [("O", "A"), ("O", "B"), ("A", "B"), ("C", "A"), ("C", "B")], [("O", 1.0)])
    ans = 90 - x
    return GeoProblem(
        fig,
        f"As shown in the figure, points A, B and C are on circle O, angle OAB = {_given(x)}, "
        "then the degree of angle ACB is ()",
        Fraction(ans),
        "°",
        [
            f"OA = OB because both are radii, so angle OBA = angle OAB = {x}°.",
            f"In triangle OAB, angle AOB = 180° - 2 × {x}° = {central}°.",
            f"Angle ACB is the inscribed angle on arc AB, so angle ACB = 1/2 × {central}° = {ans}°.",
        ],
        [Fraction(central), Fraction(x), Fraction(2 * x) if 2 * x != ans else Fraction(ans + 20), Fraction(ans + 10)],
        _angle_q("C", "A", "B"),
        {"angle OAB": x},
        {"triangle_angles": {"O": central, "A": x, "B": x}},
    )


def intersecting_lines(rng: np.random.Generator) -> GeoProblem:
    x = _multiple_of_5(rng, 20, 70)
    o = _pt(0, 0)
    pts = {"O": o, "A": _pt(-1.3, 0), "B": _pt(1.3, 0), "E": _pt(0, 1.1),
           "C": _on_circle(o, 1.2, 90 + x), "D": _on_circle(o, 1.2, 270 + x)}  # fmt: skip
    fig = Figure(pts, [("A", "B"), ("C", "D"), ("O", "E")])
    fig.right_marks = [("O", "E", "B")]
    aoc = 90 - x
    which = _pick(rng, ["BOD", "BOC", "AOD"])
    steps = [f"Since OE ⊥ AB, angle AOE = 90°, so angle AOC = 90° - angle COE = 90° - {x}° = {aoc}°."]
    if which == "BOD":
        ans, asked = aoc, _angle_q("O", "B", "D")
        steps.append(f"Angle BOD and angle AOC are vertical angles, so angle BOD = {aoc}°.")
    elif which == "BOC":
        ans, asked = 180 - aoc, _angle_q("O", "B", "C")
        steps.append(f"Angles AOC and BOC form a straight line, so angle BOC = 180° - {aoc}° = {ans}°.")
    else:
        ans, asked = 180 - aoc, _angle_q("O", "A", "D")
        steps.append(f"Angles AOC and AOD form a straight line, so angle AOD = 180° - {aoc}° = {ans}°.")
    return GeoProblem(
        fig,
        f"As shown in the figure, straight lines AB and CD intersect at point O, OE ⊥ AB, angle COE = {_given(x)}, "
        f"then the degree of angle {which} is ()",
        Fraction(ans),
        "°",
        steps,
        [Fraction(x), Fraction(180 - ans), Fraction(90 + x) if 90 + x != ans else Fraction(ans - 10), Fraction(2 * x)],
        asked,
        {"angle COE": x},
    )


_TRIPLES = ((3, 4, 5), (5, 12, 13), (8, 15, 17), (20, 21, 29), (6, 8, 10), (9, 12, 15), (15, 20, 25))


def _right_triangle(rng: np.random.Generator) -> tuple[int, int, int, dict]:
    a, b, c = _pick(rng, _TRIPLES)
    k = int(rng.integers(1, 3)) if c <= 17 else 1
    a, b, c = a * k, b * k, c * k
    if rng.random() < 0.5:
        a, b = b, a
    return a, b, c, {"C": _pt(0, 0), "A": _pt(0, a), "B": _pt(b, 0)}


def pythagoras(rng: np.random.Generator) -> GeoProblem:
    a, b, c, pts = _right_triangle(rng)
    fig = Figure(pts, [("A", "B"), ("B", "C"), ("C", "A")])
    fig.right_marks = [("C", "A", "B")]
    if rng.random() < 0.5:
        stem, ans, asked = f"AC = {_given(a)}, BC = {_given(b)}, then the length of AB is ()", c, ["A", "B"]
        steps = [f"By the Pythagorean theorem, AB² = AC² + BC² = {a * a} + {b * b} = {c * c}, so AB = {c}."]
        given = {"AC": a, "BC": b}
    else:
        stem, ans, asked = f"AB = {_given(c)}, AC = {_given(a)}, then the length of BC is ()", b, ["B", "C"]
        steps = [f"By the Pythagorean theorem, BC² = AB² - AC² = {c * c} - {a * a} = {b * b}, so BC = {b}."]
        given = {"AB": c, "AC": a}
    return GeoProblem(
        fig,
        f"As shown in the figure, in Rt△ABC, angle C = 90.0, {stem}",
        Fraction(ans),
        "",
        steps,
        [Fraction(ans + 1), Fraction(ans - 1), Fraction(ans + 2), Fraction(a + b + c - 2 * ans)],
        {"type": "length", "segment": asked},
        given,
    )


def altitude_on_hypotenuse(rng: np.random.Generator) -> GeoProblem:
    a, b, c, pts = _right_triangle(rng)
    foot_t = a * a / (c * c)  # D divides AB with AD = a²/c
    pts["D"] = pts["A"] + foot_t * (pts["B"] - pts["A"])
    fig = Figure(pts, [("A", "B"), ("B", "C"), ("C", "A"), ("C", "D")])
    fig.right_marks = [("C", "A", "B"), ("D", "C", "B")]
    lead = [f"By the Pythagorean theorem, AB = √(AC² + BC²) = √({a * a} + {b * b}) = {c}."]
    cd, ad = Fraction(a * b, c), Fraction(a * a, c)
    if rng.random() < 0.6:
        ans, target, asked = cd, "CD", ["C", "D"]
        steps = lead + [
            "The area of triangle ABC is 1/2 × AC × BC = 1/2 × AB × CD,",
            f"so CD = AC × BC ÷ AB = {a} × {b} ÷ {c} = {format_value(cd, '')}.",
        ]
    else:
        ans, target, asked = ad, "AD", ["A", "D"]
        steps = lead + [
            "Triangles ACD and ABC share angle A and both have a right angle, so they are similar and AC² = AD × AB,",
            f"so AD = AC² ÷ AB = {a * a} ÷ {c} = {format_value(ad, '')}.",
        ]
    return GeoProblem(
        fig,
        f"As shown in the figure, in Rt△ABC, angle ACB = 90.0, CD ⊥ AB at D, AC = {_given(a)}, BC = {_given(b)}, "
        f"then the length of {target} is ()",
        ans,
        "",
        steps,
        [Fraction(b * b, c), Fraction(a * b, c) if ans != cd else Fraction(a * a, c), Fraction(c, 2), ans + 1],
        {"type": "length", "segment": asked},
        {"AC": a, "BC": b},
    )


TEMPLATES: dict[str, Callable[[np.random.Generator], GeoProblem]] = {
    "triangle_angle_sum": triangle_angle_sum,
    "isosceles": isosceles,
    "exterior_angle": exterior_angle,
    "parallel_lines": parallel_lines,
    "inscribed_angle": inscribed_angle,
    "diameter_right_angle": diameter_right_angle,
    "radius_isosceles": radius_isosceles,
    "intersecting_lines": intersecting_lines,
    "pythagoras": pythagoras,
    "altitude_on_hypotenuse": altitude_on_hypotenuse,
}


# ---------------------------------------------------------------------------------------------- choices
def _choices(rng: np.random.Generator, prob: GeoProblem) -> tuple[list[str], str]:
    """Four distinct options (the answer plus three plausible wrong values) in random order."""
    limit = Fraction(180) if prob.unit == "°" else None
    wrong: list[Fraction] = []
    for d in prob.distractors:
        if d > 0 and d != prob.answer and d not in wrong and (limit is None or d < limit):
            wrong.append(d)
    step = 10 if prob.unit == "°" else 1
    k = 1
    while len(wrong) < 3:  # top up deterministically with nearby values
        for cand in (prob.answer + k * step, prob.answer - k * step):
            if cand > 0 and cand not in wrong and cand != prob.answer and (limit is None or cand < limit):
                wrong.append(cand)
        k += 1
    options = [prob.answer] + wrong[:3]
    order = rng.permutation(4)
    texts = [format_value(options[j], prob.unit) for j in order]
    return texts, LETTERS[int(np.where(order == 0)[0][0])]


# ------------------------------------------------------------------------------------------------ drawing
@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _random_pose(points: dict[str, np.ndarray], rng: np.random.Generator, max_rotation: float) -> dict:
    """Rotate (and maybe mirror) the figure so diagrams vary; lengths and angles are unchanged."""
    angle = math.radians(rng.uniform(-max_rotation, max_rotation))
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    if rng.random() < 0.5:
        rot = rot @ np.diag([-1.0, 1.0])
    return {name: rot @ p for name, p in points.items()}


class _Canvas:
    """Maps problem coordinates to supersampled pixels, fitting the figure (with circles) into the image."""

    def __init__(self, fig: Figure, size: tuple[int, int]):
        self.fig = fig
        self.w, self.h = size[0] * _SS, size[1] * _SS
        pts = np.array(list(fig.points.values()))
        lo, hi = pts.min(axis=0), pts.max(axis=0)
        for center, radius in fig.circles:
            lo = np.minimum(lo, fig.points[center] - radius)
            hi = np.maximum(hi, fig.points[center] + radius)
        margin = 0.12 * min(self.w, self.h)
        span = np.maximum(hi - lo, 1e-6)
        self.scale = min((self.w - 2 * margin) / span[0], (self.h - 2 * margin) / span[1])
        self.offset = np.array([self.w, self.h]) / 2 - (lo + hi) / 2 * self.scale * np.array([1, -1])
        self.image = Image.new("RGB", (self.w, self.h), "white")
        self.draw = ImageDraw.Draw(self.image)
        self.line = max(2, round(self.h / 150))
        self.font = _font(max(10, round(self.h * 0.06)))
        self.occupied: list[np.ndarray] = []  # centres of text already drawn

    def px(self, name_or_point) -> np.ndarray:
        p = self.fig.points[name_or_point] if isinstance(name_or_point, str) else name_or_point
        return self.offset + p * self.scale * np.array([1, -1])

    def segment(self, p: str, q: str) -> None:
        self.draw.line([tuple(self.px(p)), tuple(self.px(q))], fill="black", width=self.line)

    def circle(self, center: str, radius: float) -> None:
        c, r = self.px(center), radius * self.scale
        self.draw.ellipse([c[0] - r, c[1] - r, c[0] + r, c[1] + r], outline="black", width=self.line)

    def angle_mark(self, vertex: str, arm1: str, arm2: str, text: str) -> None:
        v = self.px(vertex)
        a1, a2 = (math.degrees(math.atan2(*(self.px(a) - v)[::-1])) for a in (arm1, arm2))
        start, end = (a1, a2) if (a2 - a1) % 360 <= 180 else (a2, a1)
        r = self.h * 0.05
        self.draw.arc([v[0] - r, v[1] - r, v[0] + r, v[1] + r], start, end, fill="black", width=self.line)
        mid = math.radians(start + ((end - start) % 360) / 2)
        pos = v + 1.9 * r * np.array([math.cos(mid), math.sin(mid)])
        self.occupied.append(pos)
        self.draw.text(tuple(pos), text, fill="black", font=self.font, anchor="mm")

    def right_mark(self, vertex: str, arm1: str, arm2: str) -> None:
        v = self.px(vertex)
        s = self.h * 0.035
        u1 = (self.px(arm1) - v) / np.linalg.norm(self.px(arm1) - v) * s
        u2 = (self.px(arm2) - v) / np.linalg.norm(self.px(arm2) - v) * s
        self.draw.line([tuple(v + u1), tuple(v + u1 + u2), tuple(v + u2)], fill="black", width=self.line)

    def tick(self, p: str, q: str) -> None:
        a, b = self.px(p), self.px(q)
        mid, d = (a + b) / 2, (b - a) / np.linalg.norm(b - a)
        n = np.array([-d[1], d[0]]) * self.h * 0.02
        self.draw.line([tuple(mid - n), tuple(mid + n)], fill="black", width=self.line)

    def _label_direction(self, name: str) -> np.ndarray:
        """Middle of the widest empty angular gap around the point, so labels avoid lines and circles."""
        here = self.px(name)
        dirs = []
        for p, q in self.fig.segments:
            for a, b in ((p, q), (q, p)):
                if a == name:
                    dirs.append(self.px(b) - here)
                elif self._on_segment(name, a, b):
                    dirs.append(self.px(b) - here)
        for vertex, arm1, arm2, *_ in self.fig.angle_marks + self.fig.right_marks:
            if vertex == name:  # keep the label off the angle's arc and its number
                u1, u2 = (self.px(a) - here for a in (arm1, arm2))
                dirs.append(u1 / np.linalg.norm(u1) + u2 / np.linalg.norm(u2))
        for center, radius in self.fig.circles:
            radial = here - self.px(center)
            if abs(np.linalg.norm(radial) - radius * self.scale) < 2 * _SS:
                dirs += [np.array([-radial[1], radial[0]]), np.array([radial[1], -radial[0]])]
        if not dirs:
            return np.array([0.0, 1.0])
        angles = sorted(math.atan2(d[1], d[0]) for d in dirs)
        if len(angles) == 1:
            return -dirs[0] / np.linalg.norm(dirs[0])
        gaps = [(angles[(k + 1) % len(angles)] - angles[k]) % (2 * math.pi) for k in range(len(angles))]
        if max(gaps) < 1e-9:  # every line leaves in the same direction
            return -dirs[0] / np.linalg.norm(dirs[0])
        k = int(np.argmax(gaps))
        mid = angles[k] + gaps[k] / 2
        return np.array([math.cos(mid), math.sin(mid)])

    def _on_segment(self, name: str, a: str, b: str) -> bool:
        p, pa, pb = (self.fig.points[n] for n in (name, a, b))
        ab = pb - pa
        t = float((p - pa) @ ab) / float(ab @ ab)
        return 0.0 < t < 1.0 and np.linalg.norm(pa + t * ab - p) < 1e-6 * max(1.0, float(np.linalg.norm(ab)))

    def _clearance(self, pos: np.ndarray) -> float:
        """Distance from a label centre to the nearest line, circle, other text or image edge."""
        gaps = [pos[0], pos[1], self.w - pos[0], self.h - pos[1]]
        for p, q in self.fig.segments:
            a, b = self.px(p), self.px(q)
            t = np.clip(float((pos - a) @ (b - a)) / float((b - a) @ (b - a)), 0.0, 1.0)
            gaps.append(float(np.linalg.norm(a + t * (b - a) - pos)))
        for center, radius in self.fig.circles:
            gaps.append(abs(float(np.linalg.norm(pos - self.px(center))) - radius * self.scale))
        gaps += [float(np.linalg.norm(pos - other)) for other in self.occupied]
        return min(gaps)

    def labels(self) -> None:
        offset = self.font.size * 0.85
        candidates = [np.array([math.cos(a), math.sin(a)]) for a in np.linspace(0, 2 * math.pi, 24, endpoint=False)]
        for name in self.fig.points:
            here, preferred = self.px(name), self._label_direction(name)
            # The widest-gap direction is a good default; clearance scoring fixes labels that hit distant lines.
            best = max(candidates, key=lambda d: self._clearance(here + d * offset) + 0.3 * offset * (d @ preferred))
            pos = here + best * offset
            self.occupied.append(pos)
            self.draw.text(tuple(pos), name, fill="black", font=self.font, anchor="mm")
            dot = self.line * 1.2
            self.draw.ellipse([here[0] - dot, here[1] - dot, here[0] + dot, here[1] + dot], fill="black")

    def finish(self, size: tuple[int, int]) -> Image.Image:
        return self.image.resize(size, Image.Resampling.LANCZOS)


def render_figure(fig: Figure, size: tuple[int, int]) -> Image.Image:
    canvas = _Canvas(fig, size)
    for center, radius in fig.circles:
        canvas.circle(center, radius)
    for p, q in fig.segments:
        canvas.segment(p, q)
    for mark in fig.angle_marks:
        canvas.angle_mark(*mark)
    for mark in fig.right_marks:
        canvas.right_mark(*mark)
    for p, q in fig.ticks:
        canvas.tick(p, q)
    canvas.labels()
    return canvas.finish(size)


# ------------------------------------------------------------------------------------------------ samples
def _check_params(i, seed, image_size, templates) -> list[str]:
    if not (isinstance(seed, int) and seed >= 0 and isinstance(i, int) and i >= 0):
        raise SuzakError(f"geo seed and index must be non-negative integers, got seed={seed!r} index={i!r}")
    if image_size[0] < 28 or image_size[1] < 28:
        raise SuzakError(f"geo image_size must be at least 28x28 pixels, got {tuple(image_size)}")
    names = list(TEMPLATES) if templates is None else list(templates)
    unknown = [t for t in names if t not in TEMPLATES]
    if unknown or not names:
        raise SuzakError(f"unknown geo templates {unknown or names}; choose from {sorted(TEMPLATES)}")
    return names


def geo_sample(
    i: int,
    seed: int,
    *,
    image_size: tuple[int, int] = (400, 300),
    templates: list[str] | tuple[str, ...] | None = None,
) -> SynthSample:
    """Problem number i of the stream (seed, params); `templates` restricts which kinds are drawn."""
    names = _check_params(i, seed, image_size, templates)
    rng = np.random.default_rng([_KIND_TAG, seed, i])
    name = _pick(rng, sorted(names))
    prob = TEMPLATES[name](rng)
    prob.figure.points = _random_pose(prob.figure.points, rng, 6 if name == "parallel_lines" else 25)
    choices, letter = _choices(rng, prob)
    answer = format_value(prob.answer, prob.unit)
    problem = prob.stem + "\nChoices:\n" + "\n".join(f"{LETTERS[k]}:{c}" for k, c in enumerate(choices))
    thinking = "<think> " + " ".join(prob.steps) + f" So the answer is {answer}, which is choice {letter}. </think>"
    meta = {
        "kind": "geo",
        "index": i,
        "seed": seed,
        "template": name,
        "image_size": [int(image_size[0]), int(image_size[1])],
        "points": {k: [float(v[0]), float(v[1])] for k, v in prob.figure.points.items()},
        "given": prob.given,
        "asked": prob.asked,
        "answer_value": float(prob.answer),
        "unit": prob.unit,
        "choices": choices,
        "answer_letter": letter,
        **prob.extra_meta,
    }
    image = render_figure(prob.figure, (int(image_size[0]), int(image_size[1])))
    return SynthSample(image=image, problem=problem, answer=answer, thinking=thinking, meta=meta)


def geo_samples(n: int, seed: int, start: int = 0, **kw) -> Iterator[SynthSample]:
    """Problems start .. start+n-1 of the stream; keyword arguments as for geo_sample."""
    if n < 0:
        raise SuzakError(f"number of geo samples must be >= 0, got {n}")
    for i in range(start, start + n):
        yield geo_sample(i, seed, **kw)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Render one synthetic GeoQA-style problem.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--template", choices=sorted(TEMPLATES), default=None)
    parser.add_argument("--out", type=Path, default=Path("geo_sample.png"))
    args = parser.parse_args(argv)
    sample = geo_sample(args.index, args.seed, templates=[args.template] if args.template else None)
    sample.image.save(args.out)
    print(f"{args.out}: {sample.problem}\n-> {sample.answer}\n{sample.thinking}")


if __name__ == "__main__":
    main()
