"""The run's report: the before/after table on the console, and report.html with curves and sample answers.

Written by trainer/pipeline.py at the end of `suzak train`; rerun alone with
    python -m trainer.report runs/default
"""

from __future__ import annotations

import base64
import html
import io
import json
import sys
from pathlib import Path


def image_grid(items, path: Path, cols: int = 4, cell: int = 224) -> Path:
    """A PNG grid of (PIL image, caption) pairs, captions drawn under each image."""
    from PIL import Image, ImageDraw

    rows = (len(items) + cols - 1) // cols
    caption_h = 56
    canvas = Image.new("RGB", (cols * cell, max(1, rows) * (cell + caption_h)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (img, caption) in enumerate(items):
        x, y = (i % cols) * cell, (i // cols) * (cell + caption_h)
        thumb = img.copy()
        thumb.thumbnail((cell, cell))
        canvas.paste(thumb, (x, y))
        for j, line in enumerate(_wrap(caption, 36)[:4]):
            draw.text((x + 4, y + cell + 2 + 13 * j), line, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def _wrap(text: str, width: int) -> list[str]:
    lines = []
    for para in text.split("\n"):
        while len(para) > width:
            lines.append(para[:width])
            para = para[width:]
        lines.append(para)
    return lines


def read_jsonl(path: Path) -> list[dict]:
    """The records of a metrics JSONL file (none when it does not exist yet)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def set_label(name: str) -> str:
    """How a held-out set is shown: A and B are the synthetic CoGenT conditions, the rest are benchmark names."""
    return f"CoGenT-{name}" if name in ("A", "B") else name


def print_table(summary: dict) -> None:
    """Before (SFT) / after (GRPO) accuracy on each held-out set of eval.benchmarks."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="held-out accuracy")
    table.add_column("checkpoint")
    sets = sorted({k for stage in ("sft", "grpo") for k in (summary.get(stage) or {})})
    for s in sets:
        table.add_column(set_label(s), justify="right")
    for stage in ("sft", "grpo"):
        if summary.get(stage):
            table.add_row(stage.upper(), *[f"{100 * summary[stage].get(s, float('nan')):.1f}%" for s in sets])
    if summary.get("sft") and summary.get("grpo"):
        table.add_row("GRPO - SFT", *[f"{100 * (summary['grpo'][s] - summary['sft'][s]):+.1f} pts" for s in sets])
    Console().print(table)
    print(f"seed {summary.get('seed')}, {summary.get('seconds')} s")


def _curves_png(out: Path) -> str | None:
    """Reward, accuracy and loss curves from the metrics files, as a base64 PNG (None when there are no metrics)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grpo = read_jsonl(out / "grpo_metrics.jsonl")
    sft = read_jsonl(out / "sft_metrics.jsonl")
    if not grpo and not sft:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    if sft:
        axes[0].plot([m["step"] for m in sft], [m.get("loss", float("nan")) for m in sft])
        axes[0].set_title("SFT loss")
    for key, label in (("reward/total", "total reward"), ("reward/accuracy", "accuracy reward"),
                       ("reward/format", "format reward")):
        axes[1].plot([m["step"] for m in grpo], [m.get(key, float("nan")) for m in grpo], label=label)
    axes[1].set_title("GRPO rewards")
    axes[1].legend()
    has_eval = False
    for key in sorted({k for m in grpo for k in m if k.startswith("eval/")}):
        pts = [(m["step"], m[key]) for m in grpo if key in m]
        if pts:
            has_eval = True
            axes[2].plot(*zip(*pts), marker="o", label=key)
    axes[2].plot([m["step"] for m in grpo], [m.get("completion_len", float("nan")) / 100 for m in grpo],
                 label="completion length / 100", alpha=0.5)
    axes[2].set_title("held-out accuracy during GRPO" if has_eval else "GRPO completion length (eval.every_steps=0)")
    axes[2].legend()
    for ax in axes:
        ax.set_xlabel("step")
    fig.tight_layout()
    (out / "curves.png").parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "curves.png", dpi=80)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _samples_html(out: Path) -> str:
    parts = []
    for path in sorted((out / "eval").glob("*.json")):
        data = json.loads(path.read_text())
        cells = []
        for rec in data.get("records", [])[:12]:
            img = rec.get("thumbnail")
            img_tag = f'<img src="data:image/png;base64,{img}">' if img else ""
            color = "#2a2" if rec.get("correct") else "#c22"
            question, truth = html.escape(str(rec.get("question", ""))), html.escape(str(rec.get("ground_truth")))
            got = html.escape(str(rec.get("extracted")))
            cells.append(f'<div class="cell" style="border-color:{color}">{img_tag}<p><b>Q:</b> {question}</p>'
                         f'<p><b>truth:</b> {truth} <b>got:</b> {got}</p>'
                         f'<pre>{html.escape(str(rec.get("output", ""))[:300])}</pre></div>')
        parts.append(f"<h3>{html.escape(path.stem)}: accuracy {data['summary']['accuracy']:.3f}</h3>"
                     f"<div class='grid'>{''.join(cells)}</div>")
    return "\n".join(parts)


def write_report(out: Path, summary: dict) -> Path:
    curves = _curves_png(out)
    rows = "".join(f"<tr><td>{k}</td>{''.join(f'<td>{100 * v:.1f}%</td>' for v in summary[k].values())}</tr>"
                   for k in ("sft", "grpo") if isinstance(summary.get(k), dict))
    heads = "".join(f"<th>{html.escape(set_label(s))}</th>" for s in (summary.get("sft") or summary.get("grpo") or {}))
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>suzak report</title><style>
body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 10px}}
.grid{{display:flex;flex-wrap:wrap;gap:8px}} .cell{{width:230px;border:3px solid;padding:4px;font-size:12px}}
.cell img{{max-width:220px}} pre{{white-space:pre-wrap;font-size:11px}}</style></head><body>
<h1>suzak run: {html.escape(str(out))}</h1>
<table><tr><th>checkpoint</th>{heads}</tr>{rows}</table>
<p>seed {summary.get('seed')}, {summary.get('seconds')} s</p>
{f'<img src="data:image/png;base64,{curves}">' if curves else '<p>no training metrics</p>'}
<h2>Sample answers (green: right, red: wrong)</h2>{_samples_html(out)}
</body></html>"""
    target = out / "report.html"
    target.write_text(page)
    return target


if __name__ == "__main__":
    folder = Path(sys.argv[1])
    s = json.loads((folder / "summary.json").read_text())
    print_table(s)
    print(write_report(folder, s))
