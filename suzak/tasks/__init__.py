"""Tasks: a data source plus R1-V's prompts, answer extraction, rewards and eval scoring.

    from suzak.tasks import get_task
    task = get_task("clevr_count")
    messages = task.messages(example, prompt="train")

Tasks: clevr_count (CLEVR counting, trains and evaluates), superclevr (SuperCLEVR counting, eval only),
geoqa (GeoQA-8K train, GeoQA test-754 eval). Prompts are R1-V's exactly (its src/eval and grpo scripts).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

# R1-V's training prompt: note the two spaces after the question.
TRAIN_TEMPLATE = ("{Question}  Output the thinking process in <think> </think> and final answer (number) in "
                  "<answer> </answer> tags.")
SUPERCLEVR_EVAL_TEMPLATE = (
    "{Question} First output the thinking process in <think> </think> and final answer (number) in "
    "<answer> </answer> tags."
)
GEOQA_EVAL_TEMPLATE = ("{Question} Output the thinking process in <think> </think> and final answer (number) in "
                       "<answer> </answer> tags.")
SYSTEM_PROMPT = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The assistant "
    "first thinks about the reasoning process in the mind and then provides the user with the answer. The reasoning "
    "process and answer are enclosed within <think> </think> and <answer> </answer> tags, respectively, i.e., "
    "<think> reasoning process here </think><answer> answer here </answer>"
)

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


@dataclass
class Example:
    """One problem: an image (PIL image or file path), the question, the gold answer and optional SFT thinking."""

    id: str
    problem: str
    answer: str
    image: Any = None
    image_path: str | None = None
    thinking: str | None = None
    ground_truth: Any = None
    """The benchmark's ground_truth exactly as read (int for SuperCLEVR, str for GeoQA)."""
    meta: dict = field(default_factory=dict)

    def load_image(self):
        """The image as an RGB PIL image (opened from image_path on demand, with a clear error)."""
        if self.image is not None:
            return self.image.convert("RGB") if self.image.mode != "RGB" else self.image
        from suzak.images import open_image

        return open_image(Path(self.image_path))

    @property
    def solution(self) -> str:
        """R1-V's solution string."""
        return f"<answer> {self.answer} </answer>"


def answer_from_solution(solution: Any) -> str:
    """'<answer> 3 </answer>' -> '3'; a plain value is stringified and stripped."""
    text = str(solution)
    m = _ANSWER_TAG.search(text)
    return (m.group(1) if m else text).strip()


@dataclass(frozen=True)
class Task:
    name: str
    answer_type: Literal["number", "math"]
    """How answers compare: integers (counting) or math expressions with units (geometry)."""
    eval_template: str
    benchmark: str
    """Benchmark whose scoring rules this task's eval uses: superclevr (int regex) or geoqa (math-verify)."""
    train_template: str = TRAIN_TEMPLATE
    synth_kind: str = "clevr"
    default_max_new_tokens: int = 256
    trainable: bool = True

    def prompt_text(self, problem: str, prompt: Literal["train", "eval"] = "train") -> str:
        template = self.train_template if prompt == "train" else self.eval_template
        return template.format(Question=problem)

    def messages(self, example: Example, prompt: Literal["train", "eval"] = "train", system: bool = False,
                 image_ref: str | None = None) -> list[dict]:
        """Chat messages in the wire format: user content = [image, text] as R1-V builds them."""
        content = [{"type": "image", "image": image_ref if image_ref is not None else example.image_path},
                   {"type": "text", "text": self.prompt_text(example.problem, prompt)}]
        msgs = [{"role": "user", "content": content}]
        if system:
            msgs.insert(0, {"role": "system", "content": SYSTEM_PROMPT})
        return msgs

    def sft_target(self, example: Example) -> str:
        """R1-V's SFT assistant turn: '{thinking}\\n\\n{solution}'."""
        thinking = example.thinking or f"<think> The answer is {example.answer}. </think>"
        return f"{thinking}\n\n{example.solution}"

    def reward_functions(self, mode: str = "guarded") -> dict[str, Callable[[str, str], float]]:
        """name -> fn(completion, answer) in [0, 1]."""
        from suzak.tasks import rewards

        answer_type = self.answer_type
        acc = rewards.get_reward("accuracy", mode)
        fmt = rewards.get_reward("format", mode)
        return {
            "accuracy": lambda completion, answer: acc(completion, answer, answer_type=answer_type),
            "format": lambda completion, answer: fmt(completion, answer, answer_type=answer_type),
        }

    def score(self, output: str, ground_truth: Any, mode: str = "r1v"):
        """Benchmark scoring of one output: scoring.Score(extracted, correct, failure)."""
        from suzak.tasks import scoring

        if self.benchmark == "superclevr":
            return scoring.score_superclevr(output, int(ground_truth), mode=mode)
        return scoring.score_geoqa(output, str(ground_truth), mode=mode)


TASKS: dict[str, Task] = {
    "clevr_count": Task("clevr_count", "number", SUPERCLEVR_EVAL_TEMPLATE, "superclevr", synth_kind="clevr"),
    "superclevr": Task("superclevr", "number", SUPERCLEVR_EVAL_TEMPLATE, "superclevr", synth_kind="clevr",
                       trainable=False),
    "geoqa": Task("geoqa", "math", GEOQA_EVAL_TEMPLATE, "geoqa", synth_kind="geo", default_max_new_tokens=1024),
}


def get_task(name: str) -> Task:
    from suzak.errors import SuzakError

    if name not in TASKS:
        raise SuzakError(f"unknown task '{name}'; known tasks: {', '.join(TASKS)}")
    return TASKS[name]
