"""Synthetic training/eval data: CLEVR-CoGenT counting scenes and GeoQA-style geometry problems.

    from suzak.synth import clevr_samples, geo_sample
    for s in clevr_samples(4, seed=0, split="A"):
        print(s.problem, s.answer)      # "How many items are there in the image?" "7"

Every sample is a pure function of (seed, index, parameters), so datasets can be generated in parallel and
any single item regenerated later. Write whole datasets with `suzak data synth --help` (suzak.synth.writers).
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


# Imported after SynthSample because the generators import it from this package.
from suzak.synth.clevr import clevr_sample, clevr_samples  # noqa: E402
from suzak.synth.geo import geo_sample, geo_samples  # noqa: E402

__all__ = ["SynthSample", "clevr_sample", "clevr_samples", "geo_sample", "geo_samples"]
