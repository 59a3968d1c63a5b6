"""One generated synthetic problem (the type every generator of suzak/synth returns).

    from suzak.synth.sample import SynthSample
"""

from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image


@dataclass
class SynthSample:
    """One generated problem.

    answer is the bare value ("3", "140°", "\\frac{12}{5}"); thinking is "<think> ... </think>"; problem is the
    question without any prompt template (suzak.tasks adds R1-V's prompt).
    """

    image: Image.Image
    problem: str
    answer: str
    thinking: str
    meta: dict = field(default_factory=dict)

    @property
    def solution(self) -> str:
        """R1-V's solution column for this sample."""
        return f"<answer> {self.answer} </answer>"
