"""Prompts, built once for the learner, the evaluator and the server: a task's chat messages with the image resized
to the pixel budget, the same messages as an HF chat template takes them, and a request's images fitted to a budget.

    from suzak.prompts import example_messages, hf_messages
    messages, image = example_messages(task, example, prompt="train", system=False, min_pixels=..., max_pixels=...)
    text = processor.apply_chat_template(hf_messages(messages), tokenize=False, add_generation_prompt=True)

Used by trainer/rollouts.py (GRPO prompts, tokenized by the learner), evaluator/run.py (eval prompts),
vllm_server/client.py (RolloutClient.prepare_images) and vllm_server/engine.py (what the server renders). The
learner checks that its prompt ids equal the server's, so both must render the messages the same way: here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Literal

from suzak import wire

if TYPE_CHECKING:
    from PIL import Image

    from suzak.tasks import Example, Task


def example_messages(task: Task, example: Example, *, prompt: Literal["train", "eval"], system: bool,
                     min_pixels: int, max_pixels: int, factor: int = 28) -> tuple[list[dict], Image.Image]:
    """(wire-format messages, the resized image): the image resized to the pixel budget at the model's `factor`
    (suzak.families; a server rejects larger ones) and inlined as a PNG data URL, so the server sees exactly the
    pixels the learner tokenizes."""
    from suzak.images import encode_image_data_url, resize_to_budget

    image = resize_to_budget(example.load_image(), min_pixels, max_pixels, factor)
    return task.messages(example, prompt=prompt, system=system, image_ref=encode_image_data_url(image)), image


def example_prompt(task: Task, example: Example, **kw) -> wire.Prompt:
    """example_messages as one wire prompt (the evaluator's unit of a request)."""
    return wire.Prompt.model_validate({"messages": example_messages(task, example, **kw)[0]})


def hf_messages(messages: Iterable[wire.ChatMessage | dict]) -> list[dict]:
    """Wire messages (objects or dicts) as an HF chat template wants them: images become {"type": "image"}
    placeholders; text content stays a string."""
    out = []
    for msg in messages:
        role, content = _get(msg, "role"), _get(msg, "content")
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        parts = [{"type": "image"} if _get(p, "type") == "image" else {"type": "text", "text": _get(p, "text") or ""}
                 for p in content]
        out.append({"role": role, "content": parts})
    return out


def _get(obj: Any, key: str) -> Any:
    return obj.get(key) if isinstance(obj, dict) else getattr(obj, key)


def fit_images(req: wire.GenerateRequest, min_pixels: int, max_pixels: int, *,
               inline_paths: bool = False, factor: int = 28) -> wire.GenerateRequest:
    """A copy of `req` with every image resized to the budget (sides multiples of `factor`, the served model's;
    sent as a PNG data URL); images already at their budget size keep their reference (local paths too unless
    inline_paths, for a server on another machine)."""
    from suzak.images import budget_size, encode_image_data_url, load_image, resize_to_budget

    out = req.model_copy(deep=True)
    for i, prompt in enumerate(out.prompts):
        for m, msg in enumerate(prompt.messages):
            for c, part in enumerate(msg.content if isinstance(msg.content, list) else []):
                if part.type != "image" or part.image is None:
                    continue
                img = load_image(part.image, field=f"prompts.{i}.messages.{m}.content.{c}.image")
                is_path = not part.image.startswith(("data:", "http://", "https://"))
                if budget_size(img.height, img.width, min_pixels, max_pixels, factor) != (img.height, img.width):
                    part.image = encode_image_data_url(resize_to_budget(img, min_pixels, max_pixels, factor))
                elif is_path and inline_paths:
                    part.image = encode_image_data_url(img)
    return out
