"""The census's machinery (tests/faults/census.py runs it): outcomes and how each is judged, the CLI as a user runs
it, real `suzak serve` processes, a local web server to fetch from, file checks, the report bench/FAULTS.md.

Outcomes: clear error (a one-line `error:` with exit code 2, or a JSON 4xx/503 with a message, the process or
server still fine), handled correctly (the input is legitimate or the fault is recovered from), traceback (or a
500, or an error without a message), hang (past its time limit), crash (the server or a process died, or was left
behind), data lost (an input or earlier output overwritten or removed), silently accepted (a bad input taken as
good), clear error, late (the right message, but after a model loaded).
"""

from __future__ import annotations

import datetime
import http.server
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:0] = [str(ROOT), str(HERE)]

import httpx  # noqa: E402
from PIL import Image  # noqa: E402

from fault_helpers import alive, descendants  # noqa: E402

CLEAR, HANDLED, LATE = "clear error", "handled correctly", "clear error, late"
TRACEBACK, HANG, CRASH, LOST, SILENT = "traceback", "hang", "crash", "data lost", "silently accepted"
GOOD = (CLEAR, HANDLED)
ORDER = (CLEAR, HANDLED, LATE, TRACEBACK, HANG, CRASH, LOST, SILENT, "census error")
SECTIONS = {1: "Server limits", 2: "Engine liveness", 3: "Orphan servers", 4: "Checkpoints", 5: "Rescoring",
            6: "Image sources on the server", 7: "Tracebacks (issue) -> clear errors", 8: "Checked early"}
MB = 1 << 20
TOKEN = "census-secret-token-0123456789"


@dataclass
class Case:
    section: int
    name: str
    outcome: str
    note: str
    seconds: float


class Census:
    def __init__(self, work: Path):
        self.work, self.cases = work, []

    def short(self, text: str, limit: int = 150) -> str:
        text = " ".join(str(text).replace(str(self.work), "$W").split())
        return text if len(text) <= limit else text[:limit - 3] + "..."

    def case(self, section: int, name: str, fn) -> None:
        start = time.monotonic()
        try:
            outcome, note = fn()
        except Exception as e:  # the census itself broke on this case: say so, go on with the next
            outcome, note = "census error", f"{type(e).__name__}: {e}"
        c = Case(section, name, outcome, self.short(note), time.monotonic() - start)
        self.cases.append(c)
        print(f"[{c.seconds:6.1f}s] {section}. {name}: {outcome} -- {c.note}", flush=True)


# --------------------------------------------------------------------------- commands


@dataclass
class Run:
    rc: int | None
    out: str
    err: str
    seconds: float

    @property
    def text(self) -> str:
        return self.out + self.err


def env(home: Path, **extra) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "SUZAK_HOME": str(home), "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **extra}


def suzak(home: Path, *argv, timeout: float = 180, cwd: Path | None = None) -> Run:
    start = time.monotonic()
    try:
        p = subprocess.run([sys.executable, "-m", "suzak", *map(str, argv)], capture_output=True, text=True,
                           timeout=timeout, env=env(home), cwd=cwd)
        return Run(p.returncode, p.stdout, p.stderr, time.monotonic() - start)
    except subprocess.TimeoutExpired as e:
        return Run(None, (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else e.stdout or "",
                   "", time.monotonic() - start)


def cli_error(run: Run, fragment: str | None = None, late_s: float | None = None) -> tuple[str, str]:
    """A command that must refuse its input: one `error:` line, exit code 2, no traceback."""
    if run.rc is None:
        return HANG, f"no answer in {run.seconds:.0f} s"
    if "Traceback (most recent call last)" in run.text:
        return TRACEBACK, run.text.strip().splitlines()[-1]
    if run.rc == 0:
        return SILENT, f"exit 0 in {run.seconds:.1f} s"
    lines = [line for line in run.err.splitlines() if line.startswith("error:")]
    if run.rc != 2 or not lines:
        return CRASH, f"exit {run.rc}: {run.text.strip()[-200:]}"
    message = run.err[run.err.index("error:"):]
    if fragment is not None and fragment not in message:
        return CLEAR, f"(expected '{fragment}') {message}"
    if late_s is not None and run.seconds > late_s:
        return LATE, f"after {run.seconds:.0f} s: {message}"
    return CLEAR, f"{run.seconds:.1f} s: {message}"


# --------------------------------------------------------------------------- servers


class Server:
    """A real `suzak serve` (its own session), on a free port."""

    def __init__(self, census: Census, home: Path, name: str, *overrides: str, extra_env: dict | None = None):
        from vllm_server.client import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = census.work / f"{name}.log"
        with open(self.log, "w") as fh:
            self.proc = subprocess.Popen([sys.executable, "-m", "suzak", "serve", f"server.port={self.port}",
                                          *overrides], stdout=fh, stderr=subprocess.STDOUT,
                                         env=env(home, **(extra_env or {})), start_new_session=True)
        self.headers = {"Authorization": f"Bearer {TOKEN}"} if extra_env and "SUZAK_SERVER_TOKEN" in extra_env \
            else {}

    def wait_ready(self, timeout: float = 900) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/ready", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise RuntimeError(f"server not ready after {timeout:.0f} s")

    def healthy(self) -> bool:
        try:
            return httpx.get(self.url + "/health", timeout=10).json() == {"status": "ok"}
        except (httpx.HTTPError, ValueError):
            return False

    def post(self, path: str, *, body=None, content: bytes | None = None, headers: dict | None = None,
             timeout: float = 180):
        try:
            if content is not None:
                return httpx.post(self.url + path, content=content, timeout=timeout,
                                  headers={"content-type": "application/json", **self.headers, **(headers or {})})
            return httpx.post(self.url + path, json=body, timeout=timeout, headers={**self.headers, **(headers or {})})
        except httpx.TimeoutException as e:
            return e
        except httpx.HTTPError as e:
            return e

    def tree(self) -> list[int]:
        return [self.proc.pid, *descendants(self.proc.pid)]

    def kill(self) -> None:
        pids = self.tree()
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        for pid in pids:
            if alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        self.proc.wait()


def http_error(srv: Server, answer, fragment: str | None = None) -> tuple[str, str]:
    """A request that must be refused: a JSON 4xx (or 503) with a message, and the server still up."""
    if isinstance(answer, httpx.TimeoutException):
        return HANG, f"no answer ({type(answer).__name__})"
    if isinstance(answer, Exception):
        return CRASH, f"{type(answer).__name__}: {answer}; server healthy: {srv.healthy()}"
    try:
        message = answer.json().get("error")
    except ValueError:
        message = None
    if not srv.healthy():
        return CRASH, f"{answer.status_code}, then /health fails"
    if answer.status_code < 400:
        return SILENT, f"{answer.status_code}"
    if answer.status_code >= 500 and answer.status_code != 503 or not message:
        return TRACEBACK, f"{answer.status_code}: {answer.text[:200]}"
    if fragment is not None and fragment not in message:
        return CLEAR, f"{answer.status_code} (expected '{fragment}'): {message}"
    return CLEAR, f"{answer.status_code}: {message}"


def gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.25)
    return [p for p in pids if alive(p)]


class ImageHost:
    """A local web server the rollout server may be asked to fetch from: /img.png, and /redirect to it."""

    def __init__(self, png: bytes):
        class Handler(http.server.BaseHTTPRequestHandler):
            hits: list[str] = []

            def do_GET(self):  # noqa: N802 - the http.server API
                Handler.hits.append(self.path)
                if self.path == "/redirect":
                    self.send_response(302)
                    self.send_header("Location", "/img.png")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(png)))
                self.end_headers()
                self.wfile.write(png)

            def log_message(self, *a):
                pass

        self.handler = Handler
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


def small_png(path: Path, size=(112, 84)) -> Path:
    Image.new("RGB", size, (10, 200, 30)).save(path)
    return path


def noise_png(size: int, seed: int) -> bytes:
    """A PNG of random pixels (it does not compress: about 3 x size^2 bytes)."""
    import io
    import random

    img = Image.frombytes("RGB", (size, size), random.Random(seed).randbytes(size * size * 3))
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()



# --------------------------------------------------------------------------- checks on files


def jsonl(path: Path, rows: list[dict], raw: bytes | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if raw is not None:
        path.write_bytes(raw)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def kept(result: tuple[str, str], path: Path, content: str) -> tuple[str, str]:
    if not path.exists() or (path.is_file() and path.read_text() != content):
        return LOST, f"{path} changed; " + result[1]
    return result


def absent(result: tuple[str, str], path: Path) -> tuple[str, str]:
    return result if result[0] != CLEAR or not (path / "sft").exists() else (LATE, "SFT ran first; " + result[1])


def unchanged(result: tuple[str, str], before: dict[Path, bytes]) -> tuple[str, str]:
    for path, content in before.items():
        if not path.is_file() or path.read_bytes() != content:
            return LOST, f"{path.name} overwritten; " + result[1]
    return result


# --------------------------------------------------------------------------- report


def write_report(c: Census, path: Path, command: str, seconds: float) -> None:
    counts = {o: sum(1 for k in c.cases if k.outcome == o) for o in ORDER}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                           cwd=ROOT).stdout.strip()
    lines = [
        "# Fault census (issue 20)", "",
        f"Run {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} on {platform.node()} "
        f"({os.cpu_count()} CPU cores, no GPU: vLLM on CPU), commit {commit.strip()}"
        f"{' + local changes' if dirty else ''}, "
        f"{seconds / 60:.1f} min:", "",
        f"    {command}", "",
        "Every bad input and fault that sections 1-8 of issue 20 name, with the variants they mention, tried against "
        "this checkout: real `suzak serve` processes on the tiny model (no --config), real `suzak train` runs of the "
        "embedded default cut short (tests/faults/fault_helpers.py TRAIN_SHORT), the CLI as a user types it. "
        "tests/faults/census.py says how each outcome is judged.", "",
        "The issue's run (2026-12-07, before the fixes) tried 76 cases: 42 clear errors, 9 handled correctly, "
        "15 tracebacks, 3 hangs, 1 crash, 2 data lost, 4 silently accepted. It named only its failures and a few "
        "others; this census tries each case named there, so its total differs.", "",
        "How the harder cases are made: the 50 MB bodies come in three shapes (one prompt's text, 400 prompts each "
        "just under the character cap, a junk field) under the default 128 MB limit; \"killed by the OOM killer\" is "
        "kill -9 (of the server, or of the learner); the engine is the topmost VLLM::EngineCore process; the "
        "off-loopback server binds 0.0.0.0 with SUZAK_SERVER_TOKEN and server.token_for_generate=true (without it, "
        "/generate off loopback takes no token: the token is opt-in, as the issue asks); URLs are served by a local "
        "web server, as no other host is reachable here.", "",
        f"## Counts ({len(c.cases)} cases)", "",
        "| outcome | cases |", "|---|---|",
        *[f"| {o} | {n} |" for o, n in counts.items() if n or o in ORDER[:-1]], "",
        "## Cases", "",
        "| # | section | case | outcome | what happened |", "|---|---|---|---|---|",
    ]
    for i, k in enumerate(sorted(c.cases, key=lambda k: k.section), 1):
        note = k.note.replace("|", "\\|")
        lines.append(f"| {i} | {k.section}. {SECTIONS[k.section]} | {k.name} | {k.outcome} | {note} |")
    path.write_text("\n".join(lines) + "\n")
