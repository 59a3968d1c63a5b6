"""Client of the rollout server, used by the learner and the evaluator (imports httpx and suzak.wire only).

    from vllm_server.client import LocalServer, RolloutClient
    with LocalServer(cfg, "runs/x/server.log") as server:            # `python -m suzak serve` on a free port
        client = RolloutClient(server.url)
        check_compatible(client.info(), cfg.model)
        resp = client.generate(client.prepare_images(request))       # images resized to the server's budget

Connection errors are retried with exponential backoff, then raise a SuzakError that says how to start a server;
an error answer (4xx/5xx) raises a SuzakError carrying the server's JSON error and the offending field. Each call
has its own timeout: status calls seconds, weight pushes `weights_timeout`, generation `timeout`.
A local server is told its parent's pid and stops when the parent dies (even by kill -9); its pid is kept in
server.pid beside its log, so a rerun stops a server an earlier run left behind.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from suzak import wire
from suzak.cpu import local_server_cpu_threads
from suzak.errors import SuzakError
from suzak.files import write_atomic
from suzak.prompts import fit_images

if TYPE_CHECKING:
    from suzak.config import ModelConfig, RunConfig

log = logging.getLogger("suzak.client")

TOKEN_ENV = "SUZAK_SERVER_TOKEN"
# Errors raised before the request reached the server, so a retry cannot run anything twice.
RETRYABLE = (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError)


class RolloutClient:
    """Typed calls to one rollout server. `token` defaults to $SUZAK_SERVER_TOKEN (admin routes off localhost)."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 1800.0, retries: int = 5,
                 backoff: float = 0.5, *, http: httpx.Client | None = None, weights_timeout: float = 300.0,
                 status_timeout: float = 30.0):
        self.url = url.rstrip("/")
        self.token = token if token is not None else (os.environ.get(TOKEN_ENV) or None)
        self.retries = retries
        self.backoff = backoff
        self.timeout = timeout
        """Read timeout of a generate call (a big batch may take long)."""
        self.weights_timeout = min(weights_timeout, timeout)
        """Read timeout of a weight push and the other admin calls."""
        self.status_timeout = min(status_timeout, timeout)
        """Read timeout of /health, /ready and /info."""
        self.max_request_bytes: int | None = None
        """The server's body limit, learned from /info; a bigger generate request is split."""
        # A short connect timeout so a missing server fails fast; reads may take as long as a big batch.
        self._own_http = http is None
        self.http = http or httpx.Client(base_url=self.url, timeout=httpx.Timeout(timeout, connect=10.0))

    @classmethod
    def for_config(cls, url: str, cfg: RunConfig, **kw) -> RolloutClient:
        """A client with the config's timeouts (server.request_timeout_s, server.weights_timeout_s)."""
        return cls(url, timeout=cfg.server.request_timeout_s, weights_timeout=cfg.server.weights_timeout_s, **kw)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> RolloutClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ plumbing

    def _timeout(self, path: str) -> float:
        if path in ("/health", "/ready", "/info"):
            return self.status_timeout
        if path == "/generate":
            return self.timeout
        return self.weights_timeout

    def _request(self, method: str, path: str, *, content: bytes | None = None,
                 retries: int | None = None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        if content is not None:
            headers["Content-Type"] = "application/json"
        attempts = (self.retries if retries is None else retries) + 1
        # Per-call timeouts on our own httpx client (a given one, e.g. a TestClient, keeps its own).
        extra = {"timeout": httpx.Timeout(self._timeout(path), connect=10.0)} if self._own_http else {}
        for attempt in range(attempts):
            try:
                return self.http.request(method, path, content=content, headers=headers, **extra)
            except RETRYABLE as e:
                if attempt == attempts - 1:
                    raise SuzakError(f"no rollout server at {self.url} ({type(e).__name__}: {e}): start one with "
                                     "`suzak serve --config ...` or check server.url") from None
                delay = self.backoff * 2 ** attempt
                log.warning("rollout server %s unreachable (%s); retry %d/%d in %.1f s", self.url,
                            type(e).__name__, attempt + 1, attempts - 1, delay)
                time.sleep(delay)
            except httpx.TimeoutException as e:
                knob = {"/generate": "server.request_timeout_s (or send smaller batches)"}.get(
                    path, "server.weights_timeout_s" if path not in ("/health", "/ready", "/info") else None)
                raise SuzakError(f"rollout server {self.url} did not answer {method} {path} within "
                                 f"{self._timeout(path):.0f} s ({type(e).__name__}); check that it is alive (its log, "
                                 "GET /ready)" + (f", or raise {knob}" if knob else "")) from None
            except httpx.TransportError as e:
                raise SuzakError(f"rollout server {self.url}: {method} {path} failed ({type(e).__name__}: {e}); "
                                 "it may have stopped: check its log") from None
        raise AssertionError("unreachable")

    def _call(self, method: str, path: str, body: Any = None, *, retries: int | None = None,
              model: type | None = None) -> Any:
        """JSON of the answer, parsed as `model` (a wire type) when given; SuzakError on a 4xx/5xx."""
        # pydantic's own JSON encoder: several times faster than json.dumps on a batch of data-URL images.
        if body is None or isinstance(body, bytes):
            content = body
        elif hasattr(body, "model_dump_json"):
            content = body.model_dump_json().encode()
        else:
            content = json.dumps(body).encode()
        resp = self._request(method, path, content=content, retries=retries)
        if resp.status_code >= 400:
            raise SuzakError(self._describe_error(method, path, resp))
        return model.model_validate_json(resp.content) if model is not None else resp.json()

    def _describe_error(self, method: str, path: str, resp: httpx.Response) -> str:
        try:
            body = resp.json()
        except ValueError:
            body = {"error": resp.text[:500]}
        message = body.get("error") or body.get("detail") or str(body)
        field = f" (field: {body['field']})" if body.get("field") else ""
        return f"rollout server {self.url}: {method} {path} -> {resp.status_code}: {message}{field}"

    # ------------------------------------------------------------------ status

    def health(self) -> bool:
        """True when the HTTP server answers (the engine may still be loading)."""
        try:
            return self._request("GET", "/health", retries=0).status_code == 200
        except SuzakError:
            return False

    def ready(self) -> bool:
        """True once the engine is loaded; raises when it failed to load."""
        try:
            resp = self._request("GET", "/ready", retries=0)
        except SuzakError:
            return False
        if resp.status_code == 503 and ("failed to load" in resp.text or "engine died" in resp.text):
            raise SuzakError(self._describe_error("GET", "/ready", resp))
        return resp.status_code == 200

    def wait_ready(self, timeout_s: float = 600.0, poll_s: float = 1.0,
                   process: subprocess.Popen | None = None, log_path: str | Path | None = None) -> wire.ModelInfo:
        """Poll /ready until the engine is loaded; fail early when `process` (a local server) exits."""
        start = time.monotonic()
        deadline, next_note = start + timeout_s, start + 30.0
        while time.monotonic() < deadline:
            if self.ready():
                return self.info()
            if process is not None and process.poll() is not None:
                raise SuzakError(f"the rollout server exited with code {process.returncode} before it was ready"
                                 + _log_tail(log_path))
            if time.monotonic() >= next_note:
                state = "loading its engine" if self.health() else "not answering (connection refused?)"
                log.warning("rollout server %s %s after %.0f s; waiting up to %.0f s (server.startup_timeout_s)",
                            self.url, state, time.monotonic() - start, timeout_s)
                next_note += 30.0
            time.sleep(poll_s)
        raise SuzakError(f"rollout server {self.url} not ready after {timeout_s:.0f} s (server.startup_timeout_s)"
                         + _log_tail(log_path))

    def info(self) -> wire.ModelInfo:
        info = self._call("GET", "/info", model=wire.ModelInfo)
        self.max_request_bytes = info.max_request_bytes
        return info

    # ------------------------------------------------------------------ generation

    def generate(self, req: wire.GenerateRequest) -> wire.GenerateResponse:
        """Generate; a request over the server's body limit is sent in parts (prompt i keeps seed + i)."""
        content = req.model_dump_json().encode()
        if self.max_request_bytes is None or len(content) <= self.max_request_bytes:
            return self._call("POST", "/generate", content, model=wire.GenerateResponse)
        if len(req.prompts) == 1:
            raise SuzakError(f"one prompt makes a {len(content) / 2**20:.1f} MB request, over rollout server "
                             f"{self.url}'s limit of {self.max_request_bytes / 2**20:.1f} MB (server.max_request_mb): "
                             "send smaller images or raise the server's limit")
        del content
        half = len(req.prompts) // 2
        s = req.sampling
        first = self.generate(wire.GenerateRequest(prompts=req.prompts[:half], sampling=s))
        rest = self.generate(wire.GenerateRequest(prompts=req.prompts[half:], sampling=s.model_copy(
            update={"seed": None if s.seed is None else s.seed + half})))
        return wire.GenerateResponse(results=first.results + rest.results, seconds=first.seconds + rest.seconds,
                                     policy_version=min(first.policy_version, rest.policy_version))

    def prepare_images(self, req: wire.GenerateRequest, info: wire.ModelInfo | None = None) -> wire.GenerateRequest:
        """A copy of `req` whose images fit the server's pixel budget (resized ones are sent as PNG data URLs).

        Local paths are kept for a server on this machine and inlined as data URLs for a remote one."""
        info = info or self.info()
        local = httpx.URL(self.url).host in ("127.0.0.1", "localhost", "::1", "testserver")
        return fit_images(req, info.min_pixels, info.max_pixels, inline_paths=not local, factor=info.patch_factor)

    # ------------------------------------------------------------------ weights and memory

    def init_transport(self, req: wire.TransportInitRequest) -> dict:
        return self._call("POST", "/weights/init", req)

    def update_weights(self, req: wire.WeightUpdateRequest) -> wire.WeightUpdateResponse:
        return self._call("POST", "/weights", req, model=wire.WeightUpdateResponse)

    def sleep(self, level: int = 1) -> dict:
        return self._call("POST", "/sleep", wire.SleepRequest(level=level))

    def wake(self, tags: list[str] | None = None) -> dict:
        return self._call("POST", "/wake", wire.WakeRequest(tags=tags))

    def reset_prefix_cache(self) -> dict:
        return self._call("POST", "/reset_prefix_cache")


# --------------------------------------------------------------------------- helpers


def check_compatible(info: wire.ModelInfo, model_cfg: ModelConfig) -> None:
    """Refuse a server whose image budget differs from the learner's: both must see the same pixels."""
    diffs = [f"{key}: server {getattr(info, key)}, config {getattr(model_cfg, key)}"
             for key in ("min_pixels", "max_pixels") if getattr(info, key) != getattr(model_cfg, key)]
    if diffs:
        raise SuzakError("the rollout server resizes images differently from this config (" + "; ".join(diffs)
                         + "): restart the server with the same model.min_pixels/model.max_pixels, or set them "
                         "here to the server's values")


def _log_tail(log_path: str | Path | None, lines: int = 30) -> str:
    if log_path is None or not Path(log_path).is_file():
        return ""
    tail = Path(log_path).read_text(errors="replace").splitlines()[-lines:]
    return f"\nlast lines of {log_path}:\n" + "\n".join(tail)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class LocalServer:
    """A local rollout server (`python -m suzak serve` for `cfg`) as a context manager: started and ready on entry,
    stopped on exit. spawn() starts it without waiting, so its start-up can overlap other work; restart() starts
    it again (after a crash) on the same log, with a new config if given."""

    def __init__(self, cfg: RunConfig, log_path: str | Path, *, env: dict | None = None,
                 timeout_s: float | None = None):
        self.cfg, self.log_path, self.env = cfg, Path(log_path), env
        self.timeout_s = timeout_s or cfg.server.startup_timeout_s
        self.process: subprocess.Popen | None = None
        self.url: str | None = None
        self._ready = False

    def spawn(self) -> LocalServer:
        if self.process is None:
            self.process, self.url = spawn_local_server(self.cfg, self.log_path, env=self.env)
            self._ready = False
        return self

    def wait(self) -> LocalServer:
        """Spawn if needed and wait until ready; on failure the server is stopped and the error names its log."""
        self.spawn()
        if not self._ready:
            try:
                wait_local_server(self.process, self.url, self.timeout_s, self.log_path)
            except BaseException:
                self.process = None  # wait_local_server stopped it
                raise
            self._ready = True
        return self

    def restart(self, cfg: RunConfig | None = None) -> LocalServer:
        self.stop()
        self.cfg = cfg if cfg is not None else self.cfg
        return self.wait()

    def stop(self) -> None:
        process, self.process, self._ready = self.process, None, False
        if process is not None:
            stop_local_server(process)

    def __enter__(self) -> LocalServer:
        return self.wait()

    def __exit__(self, *exc) -> None:
        self.stop()


def start_local_server(cfg: RunConfig, log_path: str | Path, *, env: dict | None = None,
                       timeout_s: float | None = None) -> tuple[subprocess.Popen, str]:
    """Spawn `python -m suzak serve` for `cfg` on a free localhost port and wait until it is ready.

    Returns (process, url). The caller stops it (stop_local_server, or use LocalServer); the server's output goes to
    log_path, and its resolved config to server_config.yaml beside it.
    """
    process, url = spawn_local_server(cfg, log_path, env=env)
    wait_local_server(process, url, timeout_s or cfg.server.startup_timeout_s, log_path)
    return process, url


def spawn_local_server(cfg: RunConfig, log_path: str | Path, *,
                       env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """Spawn the server as start_local_server does, without waiting for it (see wait_local_server)."""
    from suzak.config import save_config

    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    stop_stale_server(log_path.parent)
    port = free_port()
    server_cfg = cfg.model_copy(deep=True)
    server_cfg.server.host, server_cfg.server.port, server_cfg.server.url = "127.0.0.1", port, None
    server_cfg.server.cpu_threads = local_server_cpu_threads(cfg)
    config_path = save_config(server_cfg, log_path.parent, name="server_config.yaml")
    cmd = [sys.executable, "-m", "suzak", "serve", "--config", str(config_path)]
    # The server stops when this process dies, even by kill -9 (vllm_server/app.py watches the parent pid).
    child_env = {**os.environ, **(env or {}), PARENT_ENV: str(os.getpid())}
    with open(log_path, "ab") as log_file:
        # Its own process group, so stopping it also stops vLLM's engine/worker children even mid-start.
        process = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=child_env,
                                   start_new_session=True)
    _write_pid_file(log_path.parent, process.pid, config_path)
    return process, f"http://127.0.0.1:{port}"


PID_FILE = "server.pid"
PARENT_ENV = "SUZAK_SERVER_PARENT_PID"


def _start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _write_pid_file(folder: Path, pid: int, config_path: Path) -> None:
    record = {"pid": pid, "start_time": _start_time(pid), "config": str(Path(config_path).resolve())}
    write_atomic(folder / PID_FILE, json.dumps(record))


def stop_stale_server(folder: str | Path, timeout_s: float = 30.0) -> bool:
    """Stop a local server that an earlier run in `folder` left running (its server.pid names it); True if one was.

    The pid must still belong to that server (same start time, `suzak serve` on that folder's config)."""
    import signal

    pid_file = Path(folder) / PID_FILE
    try:
        record = json.loads(pid_file.read_text())
        pid, started, config = int(record["pid"]), record.get("start_time"), record.get("config", "")
    except (OSError, ValueError, KeyError, TypeError):
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        cmdline = []
    if not cmdline or started is None or _start_time(pid) != started or "serve" not in cmdline \
            or config not in cmdline:
        with contextlib.suppress(OSError):
            pid_file.unlink()
        return False
    log.warning("a rollout server from an earlier run is still running (pid %d, %s): stopping it", pid, config)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)  # its own session: the engine processes too
        deadline = time.monotonic() + (timeout_s if sig == signal.SIGTERM else 10)
        while time.monotonic() < deadline and _start_time(pid) == started and pid_alive(pid):
            time.sleep(0.2)
        if not (_start_time(pid) == started and pid_alive(pid)):
            break
    with contextlib.suppress(OSError):
        pid_file.unlink()
    return True


def pid_alive(pid: int) -> bool:
    """Running (a zombie, dead but not yet reaped by its parent, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def wait_local_server(process: subprocess.Popen, url: str, timeout_s: float, log_path: str | Path) -> None:
    """Wait until a spawned server answers; on failure or Ctrl-C it is stopped and the error names its log."""
    client = RolloutClient(url, timeout=30.0, retries=0)
    try:
        client.wait_ready(timeout_s, process=process, log_path=Path(log_path))
    except BaseException:
        stop_local_server(process)
        raise
    finally:
        client.close()
    log.info("rollout server ready at %s (pid %d, log %s)", url, process.pid, log_path)


def stop_local_server(process: subprocess.Popen, timeout_s: float = 30.0) -> None:
    """SIGTERM (vLLM then stops its engine processes), SIGKILL if it lingers."""
    import signal

    def _signal_group(sig) -> None:
        try:
            os.killpg(process.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
    _signal_group(signal.SIGKILL)  # leftovers of the group (a vLLM engine orphaned mid-start)
    for folder in {Path(a).parent for a in (process.args if isinstance(process.args, list) else [])
                   if str(a).endswith("server_config.yaml")}:
        with contextlib.suppress(OSError, ValueError):
            if json.loads((folder / PID_FILE).read_text()).get("pid") == process.pid:
                (folder / PID_FILE).unlink()
