"""Files written whole: a reader (or a crash) never sees half of one.

    from suzak.files import write_atomic
    write_atomic(out / "summary.json", json.dumps(summary))

Used for every small output the project rewrites in place: config.yaml, summary.json, predictions.jsonl,
report.html, the metrics log after a resume, the local server's server.pid.
"""

from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write `data` (text as UTF-8) to <path>.tmp, then rename it over `path`; returns the path."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if isinstance(data, bytes):
        tmp.write_bytes(data)
    else:
        tmp.write_text(data, encoding="utf-8")
    os.replace(tmp, path)  # atomic on one filesystem: the old file or the new one, never a mix
    return path
