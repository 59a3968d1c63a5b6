"""report.html and the console table of one evaluation: what the model saw, said, and whether it was right.

    suzak eval superclevr --model M --data data/superclevr     # writes <out>/report.html and prints the table

The HTML is one self-contained file: thumbnails are embedded as base64 JPEG, so it can be copied off a
cloud machine and opened anywhere. Each card shows the image, question, output, extracted answer and truth,
framed green (right) or red (wrong); a checkbox hides the right ones.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

from suzak.files import write_atomic

THUMB_SIZE = 192  # px, longest side: enough to count CLEVR objects, small enough for 754 GeoQA cards


def thumbnail_data_url(image) -> str:
    """A small JPEG data URL of a PIL image."""
    thumb = image.convert("RGB")
    thumb.thumbnail((THUMB_SIZE, THUMB_SIZE))
    buf = io.BytesIO()
    thumb.save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _image_for(record: dict, images: dict[str, Any] | None, base: Path | None):
    """The record's image: the in-memory one when given, else the file image_path (relative to base); None if gone."""
    if images and record["id"] in images:
        return images[record["id"]]
    path = record.get("image_path")
    if not path:
        return None
    path = Path(path)
    if not path.is_absolute() and base is not None:
        path = base / path
    if not path.is_file():
        return None
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except OSError:
        return None  # the report still shows the text of a prediction whose image went missing


_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;background:#fafafa;color:#222}
table.sum{border-collapse:collapse;margin-bottom:1em}table.sum td,table.sum th{border:1px solid #ccc;padding:3px 8px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(300px,1fr));gap:12px}
.card{background:#fff;border:3px solid;border-radius:6px;padding:8px;font-size:13px;overflow:hidden}
.card.right{border-color:#2e9d47}.card.wrong{border-color:#d33}
.card img{max-width:100%;display:block;margin:0 auto 6px}
.verdict.right{color:#2e9d47;font-weight:bold}.verdict.wrong{color:#d33;font-weight:bold}
pre{white-space:pre-wrap;word-break:break-word;background:#f3f3f3;padding:4px;max-height:14em;overflow:auto;
margin:4px 0}
.q{white-space:pre-wrap}body.only-wrong .card.right{display:none}
"""


def _card(record: dict, image) -> str:
    e = html.escape
    verdict = "right" if record["correct"] else "wrong"
    img = (f'<img src="{thumbnail_data_url(image)}" alt="">' if image is not None
           else "<p><i>image not available</i></p>")
    extracted = "—" if record["extracted"] is None else e(str(record["extracted"]))
    return (
        f'<div class="card {verdict}">{img}'
        f'<div><b>#{e(str(record["id"]))}</b> <span class="verdict {verdict}">{verdict.upper()}</span></div>'
        f'<div class="q"><b>Q:</b> {e(str(record["question"]))}</div>'
        f'<pre>{e(str(record["output"]))}</pre>'
        f'<div><b>extracted:</b> {extracted} &nbsp; <b>truth:</b> {e(str(record["ground_truth"]))}</div></div>'
    )


def _summary_table(summary: dict) -> str:
    e = html.escape
    lo, hi = summary["ci95"]
    f = summary["failures"]
    rows = [
        ("model", summary["model"]), ("benchmark", summary["benchmark"]),
        ("accuracy", f"{100 * summary['accuracy']:.2f}% ({summary['correct']}/{summary['n']})"),
        ("95% CI (Wilson)", f"{100 * lo:.1f}% – {100 * hi:.1f}%"),
        ("failures", f"no_tag {f['no_tag']}, unparsable {f['unparsable']}, wrong {f['wrong']}"),
        ("scoring / prompt", f"{summary['scoring']} / {summary['prompt']}"),
        ("max_new_tokens", summary["max_new_tokens"]), ("seconds", f"{summary['seconds']:.1f}"),
    ]
    body = "".join(f"<tr><th>{e(k)}</th><td>{e(str(v))}</td></tr>" for k, v in rows)
    return f'<table class="sum">{body}</table>'


def write_report(path: str | Path, records: list[dict], summary: dict, *, images: dict[str, Any] | None = None,
                 image_base: str | Path | None = None) -> Path:
    """Write report.html: the summary, then one card per prediction (wrong ones first, the interesting ones)."""
    path = Path(path)
    base = Path(image_base) if image_base is not None else path.parent
    ordered = sorted(records, key=lambda r: bool(r["correct"]))
    cards = "\n".join(_card(r, _image_for(r, images, base)) for r in ordered)
    title = html.escape(f"suzak eval {summary['benchmark']} — {summary['model']}")
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>{_CSS}</style></head>"
        f"<body><h1>{title}</h1>{_summary_table(summary)}"
        "<label><input type='checkbox' onchange=\"document.body.classList.toggle('only-wrong',this.checked)\"> "
        "show only wrong</label><p></p>"
        f'<div class="grid">\n{cards}\n</div></body></html>'
    )
    return write_atomic(path, page)


# --------------------------------------------------------------------------- console


def print_table(summary: dict, references=(), console=None) -> None:
    """A rich table: this run's accuracy with its 95% CI and failures, beside the published reference scores."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    lo, hi = summary["ci95"]
    f = summary["failures"]
    table = Table(title=f"suzak eval {summary['benchmark']}  (scoring={summary['scoring']}, "
                        f"prompt={summary['prompt']}, max_new_tokens={summary['max_new_tokens']})")
    for col in ("model", "n", "accuracy", "95% CI", "no_tag", "unparsable", "wrong"):
        table.add_column(col, justify="left" if col == "model" else "right")
    table.add_row(f"[bold]{summary['model']}[/bold]", str(summary["n"]),
                  f"[bold]{100 * summary['accuracy']:.2f}%[/bold]", f"{100 * lo:.1f}–{100 * hi:.1f}%",
                  str(f["no_tag"]), str(f["unparsable"]), str(f["wrong"]))
    console.print(table)
    if not references:
        return
    ref = Table(title="published scores (R1-V eval prompt, r1v scoring)")
    for col in ("model", "before", "after", "note"):
        ref.add_column(col, justify="right" if col in ("before", "after") else "left")
    for r in references:
        ref.add_row(r.model, _pct(r.before), _pct(r.after), r.note)
    console.print(ref)
    if summary["scoring"] != "r1v" or summary["prompt"] != "eval":
        console.print("[yellow]note: this run's scoring/prompt differ from the published setting, so the numbers "
                      "are not directly comparable.[/yellow]")


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}%"
