"""Synthetic training/eval data: CLEVR-CoGenT counting scenes and GeoQA-style geometry problems.

    from suzak.synth import clevr_samples, geo_sample
    for s in clevr_samples(4, seed=0, split="A"):
        print(s.problem, s.answer)      # "How many items are there in the image?" "7"

Every sample is a pure function of (seed, index, parameters), so datasets can be generated in parallel and
any single item regenerated later. Write whole datasets with `suzak data synth --help` (suzak.synth.writers).
"""

from __future__ import annotations

from suzak.synth.clevr import clevr_sample, clevr_samples
from suzak.synth.geo import geo_sample, geo_samples
from suzak.synth.sample import SynthSample

__all__ = ["SynthSample", "clevr_sample", "clevr_samples", "geo_sample", "geo_samples"]
