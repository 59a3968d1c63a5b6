"""The rollout server's HTTP API (FastAPI), around a generation engine (vLLM's AsyncLLM in engine.py).

    suzak serve --config configs/qwen25vl_7b_clevr.yaml            # binds server.host:server.port
    curl localhost:8000/info                                         # OpenAPI: localhost:8000/docs

Routes: GET /health, /ready, /info; POST /generate; admin: POST /weights, /weights/init, /sleep, /wake,
/reset_prefix_cache. Every request is validated against suzak/wire.py before the engine sees it: a bad body is
a 422 and a bad image or an over-long prompt a 400, as JSON {"error", "field", "detail"}; the server keeps serving.

Limits (ServerLimits, from server.*): bodies over max_request_mb get a 413 before they are read; prompt text
over max_prompt_chars a 400 before tokenising; image sizes are read from the header and refused over max_pixels
before decoding. A dead vLLM engine fails requests at once (503) and stops the server with a non-zero code.

Security: the default bind is 127.0.0.1. Bound anywhere else, the admin routes need the header
`Authorization: Bearer $SUZAK_SERVER_TOKEN`, and the server refuses to start without that variable; it then opens
no local image paths (unless server.allowed_image_roots) and fetches no URLs (unless server.allow_image_urls).
The ipc transport carries pickled CUDA IPC handles, and unpickling runs code: keep such a server on an internal
network only, reachable by the learner alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hmac
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from suzak import wire
from suzak.errors import SuzakError
from suzak.images import ImagePolicy
from suzak.prompts import hf_messages
from vllm_server.engine import Engine, EnginePrompt, RequestError

log = logging.getLogger("suzak.server")

TOKEN_ENV = "SUZAK_SERVER_TOKEN"
PARENT_ENV = "SUZAK_SERVER_PARENT_PID"
"""Set by start_local_server: the server stops when this process (the learner or evaluator) is gone."""
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
MB = 1 << 20
INT64_MAX = 2**63 - 1
CHARS_PER_TOKEN_CAP = 32
"""Prompt text longer than this many characters per max_model_len token cannot fit, whatever the tokenizer."""
STOP_GRACE_S = 30.0
"""Once told to stop, the server has this long to shut down cleanly before its children are killed and it exits."""


@dataclass(frozen=True)
class ServerLimits:
    """What one request may carry, and who may ask (built from the config's server section by limits_for)."""

    max_request_bytes: int = 128 * MB
    max_prompt_chars: int | None = None
    """None: CHARS_PER_TOKEN_CAP x max_model_len."""
    images: ImagePolicy = field(default_factory=ImagePolicy)
    generate_token: str | None = None
    """When set, /generate and /info need `Authorization: Bearer <token>` too."""
    engine_check_s: float = 1.0
    """How often the engine's liveness is checked."""


def limits_for(cfg, token: str | None = None) -> ServerLimits:
    """The limits `suzak serve` enforces for a RunConfig: defaults depend on whether the bind is loopback."""
    srv = cfg.server
    local = srv.host in LOCAL_HOSTS
    roots = srv.allowed_image_roots
    if roots is None:
        roots = None if local else ()
    allow_urls = srv.allow_image_urls if srv.allow_image_urls is not None else local
    max_bytes = int(srv.max_request_mb * MB)
    return ServerLimits(
        max_request_bytes=max_bytes, max_prompt_chars=srv.max_prompt_chars or None,
        images=ImagePolicy(roots=None if roots is None else tuple(str(r) for r in roots), allow_urls=allow_urls,
                           max_bytes=max_bytes),
        generate_token=token if (srv.token_for_generate and token) else None)


def _error(status: int, message: str, field: str | None = None, detail: str | None = None) -> JSONResponse:
    body = wire.ErrorResponse(error=message, field=field, detail=detail).model_dump(exclude_none=True)
    return JSONResponse(body, status_code=status)


def _loc_to_field(loc: tuple) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path"):
        parts = parts[1:]
    return ".".join(parts)


# --------------------------------------------------------------------------- images


def _prompt_chars(prompt: wire.Prompt) -> int:
    total = 0
    for msg in prompt.messages:
        if isinstance(msg.content, str):
            total += len(msg.content)
        else:
            total += sum(len(part.text or "") for part in msg.content)
    return total


def check_request(req: wire.GenerateRequest, info: wire.ModelInfo, limits: ServerLimits) -> None:
    """Cheap checks before any image is read or any text tokenised (400 naming the field)."""
    s = req.sampling
    if s.seed is not None and not -INT64_MAX - 1 <= s.seed <= INT64_MAX:
        raise RequestError(f"sampling.seed must be a 64-bit integer, between -2**63 and 2**63-1 (got {s.seed})",
                           field="sampling.seed")
    for name in ("top_k", "max_tokens"):
        if getattr(s, name) > 2**31 - 1:
            raise RequestError(f"sampling.{name} must be at most 2**31-1 (got {getattr(s, name)})",
                               field=f"sampling.{name}")
    for name in ("temperature", "top_p"):
        if not math.isfinite(getattr(s, name)):
            raise RequestError(f"sampling.{name} must be a finite number (got {getattr(s, name)})",
                               field=f"sampling.{name}")
    cap = limits.max_prompt_chars or CHARS_PER_TOKEN_CAP * info.max_model_len
    for i, prompt in enumerate(req.prompts):
        chars = _prompt_chars(prompt)
        if chars > cap:
            raise RequestError(
                f"prompt {i} has {chars} characters of text, over the server's cap of {cap} "
                f"(server.max_prompt_chars; it cannot fit max_model_len {info.max_model_len} tokens): shorten it",
                field=f"prompts.{i}")


def _engine_prompt(index: int, prompt: wire.Prompt, info: wire.ModelInfo,
                        policy: ImagePolicy | None = None) -> EnginePrompt:
    import dataclasses

    from suzak.images import load_image

    policy = dataclasses.replace(policy or ImagePolicy(), max_pixels=info.max_pixels)
    images, count = [], 0
    for m, msg in enumerate(prompt.messages):
        if isinstance(msg.content, str):
            continue
        for c, part in enumerate(msg.content):
            where = f"prompts.{index}.messages.{m}.content.{c}"
            if part.type == "text" and part.text is None:
                raise RequestError("a text part needs 'text'", field=f"{where}.text")
            if part.type != "image":
                continue
            if part.image is None:
                raise RequestError("an image part needs 'image' (a path, an http(s) URL or a data: URL)",
                                   field=f"{where}.image")
            count += 1
    if count > info.max_images_per_prompt:  # counted before any image is opened
        raise RequestError(f"prompt {index} has {count} images; the server takes at most "
                           f"{info.max_images_per_prompt} per prompt", field=f"prompts.{index}")
    for m, msg in enumerate(prompt.messages):
        for c, part in enumerate(msg.content if isinstance(msg.content, list) else []):
            if part.type != "image":
                continue
            where = f"prompts.{index}.messages.{m}.content.{c}.image"
            try:
                images.append(load_image(part.image, field=where, policy=policy))
            except RequestError:
                raise
            except SuzakError as e:
                raise RequestError(str(e), field=where) from None
    return EnginePrompt(messages=hf_messages(prompt.messages), images=images)


def load_engine_prompts(req: wire.GenerateRequest, info: wire.ModelInfo,
                        policy: ImagePolicy | None = None) -> list[EnginePrompt]:
    """Load and check every image of a request (400 naming the field of the first bad one)."""
    if len(req.prompts) < 4:
        return [_engine_prompt(i, p, info, policy) for i, p in enumerate(req.prompts)]
    # PNG/JPEG decoding releases the GIL: a few threads cut a 64-image batch's decode time several-fold.
    with ThreadPoolExecutor(max_workers=min(8, len(req.prompts))) as pool:
        return list(pool.map(lambda ip: _engine_prompt(ip[0], ip[1], info, policy), enumerate(req.prompts)))


# --------------------------------------------------------------------------- request size


def _trim_memory() -> None:
    """Give freed heap back to the OS after a large body (glibc keeps it otherwise)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class BodyLimit:
    """ASGI middleware: a POST body over `max_bytes` is answered 413 (JSON) before it is parsed.

    A declared Content-Length over the limit is refused without storing a byte; a chunked body is read up to the
    limit. The rest is read and dropped (up to `drain_bytes`), so that the client, still sending, sees the 413
    rather than a reset connection."""

    def __init__(self, app, max_bytes: int, drain_bytes: int = 1 << 30):
        self.app, self.max_bytes, self.drain_bytes = app, max_bytes, drain_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        try:
            declared_len = int(declared) if declared is not None else None
        except ValueError:
            declared_len = None
        if declared_len is not None and declared_len > self.max_bytes:
            await self._drain(receive, 0)
            return await self._refuse(send, declared_len)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunk = message.get("body", b"")
            size += len(chunk)
            more = message.get("more_body", False)
            if size > self.max_bytes:
                chunks.clear()
                if more:
                    await self._drain(receive, size)
                return await self._refuse(send, size, more)
            chunks.append(chunk)
        body = b"".join(chunks)
        chunks.clear()
        replayed = False

        async def replay():
            nonlocal replayed, body
            if not replayed:
                replayed = True
                out, body = body, b""
                return {"type": "http.request", "body": out, "more_body": False}
            return await receive()

        try:
            await self.app(scope, replay, send)
        finally:
            if size > 8 * MB:
                await asyncio.to_thread(_trim_memory)

    async def _drain(self, receive, seen: int) -> None:
        while seen < self.drain_bytes:
            message = await receive()
            if message["type"] != "http.request":
                return
            seen += len(message.get("body", b""))
            if not message.get("more_body", False):
                return

    async def _refuse(self, send, size: int, at_least: bool = False) -> None:
        body = wire.ErrorResponse(
            error=f"request body is {'over ' if at_least else ''}{size / MB:.1f} MB, over the server's limit of "
                  f"{self.max_bytes / MB:.1f} MB (server.max_request_mb): send fewer prompts per request, or "
                  "smaller images").model_dump_json(exclude_none=True).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"connection", b"close"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


# --------------------------------------------------------------------------- the app


def _token_guard(token: str | None, what: str = "this route") -> Callable:
    async def check(request: Request) -> None:
        if token is None:
            return
        header = request.headers.get("authorization", "")
        given = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else ""
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise RequestError(f"{what} needs 'Authorization: Bearer <token>' with the server's {TOKEN_ENV} "
                               "(RolloutClient(token=...) or the SUZAK_SERVER_TOKEN variable sends it)", status=401)
    return check


_admin_guard = _token_guard


def _install_error_handlers(app: FastAPI, engine: Engine) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        if first.get("type") == "json_invalid":
            ctx = first.get("ctx") or {}
            return _error(422, f"the request body is not valid JSON ({ctx.get('error', first['msg'])} at position "
                               f"{_loc_to_field(first['loc']) or '?'})")
        detail = "; ".join(f"{_loc_to_field(e['loc']) or 'body'}: {e['msg']}" for e in errors)
        field = _loc_to_field(first["loc"]) or None
        return _error(422, f"invalid request: {field or 'body'}: {first['msg']}", field=field, detail=detail[:2000])

    @app.exception_handler(RequestError)
    async def _request_error(_: Request, exc: RequestError) -> JSONResponse:
        return _error(exc.status, str(exc), field=exc.field)

    @app.exception_handler(SuzakError)
    async def _suzak_error(_: Request, exc: SuzakError) -> JSONResponse:
        return _error(400, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = {404: f"no route {request.url.path}; see /docs",
                   405: f"{request.method} is not allowed on {request.url.path}; see /docs"}.get(
            exc.status_code, str(exc.detail))
        if exc.status_code == 400 and "parsing the body" in message:
            message = "the request body cannot be parsed: send UTF-8 JSON (Content-Type: application/json)"
        return _error(exc.status_code, message)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        # Starlette re-raises after this answer, so uvicorn logs the traceback.
        if engine.check_alive() or engine.dead_error:
            return _error(503, f"the vLLM engine died ({engine.dead_error or engine.check_alive()}); the server is "
                               "stopping: restart it (the learner's local server is restarted by rerunning)")
        text = str(exc) or repr(exc)
        return _error(500, f"server error: {type(exc).__name__}: {text}", detail="see the server log")


class _Liveness:
    """Watches the engine once it is loaded; when it dies, requests in flight fail at once and the server stops."""

    def __init__(self, engine: Engine, on_fatal: Callable[[], None] | None, check_s: float):
        self.engine, self.on_fatal, self.check_s = engine, on_fatal, check_s
        self.halt: asyncio.Event | None = None  # set when the engine died or the server is stopping
        self.stopping = False
        self.loop: asyncio.AbstractEventLoop | None = None

    def bind(self) -> None:
        """Make the event (inside the running loop)."""
        self.loop, self.halt = asyncio.get_running_loop(), asyncio.Event()

    def request_stop(self) -> None:
        """From any thread: the server is stopping (SIGTERM, parent gone); requests in flight get a 503 now."""
        self.stopping = True
        if self.loop is not None and self.halt is not None:
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                self.loop.call_soon_threadsafe(self.halt.set)

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(self.check_s)
            reason = self.engine.check_alive()
            if reason:
                self.engine.dead_error = reason
                self.halt.set()
                log.error("the engine died: %s; stopping the server", reason)
                await asyncio.sleep(min(1.0, self.check_s))  # the requests in flight get their 503 first
                if self.on_fatal is not None:
                    self.on_fatal()
                return

    async def guard(self, coro):
        """Await `coro`, unless the engine dies or the server stops first: then a 503 at once, not a hang."""
        if self.engine.dead_error or self.stopping:
            coro.close()
            raise self.died()
        if self.halt is None:
            return await coro
        task = asyncio.ensure_future(coro)
        halt = asyncio.ensure_future(self.halt.wait())
        try:
            await asyncio.wait({task, halt}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            raise
        finally:
            halt.cancel()
        if task.done():
            try:
                return task.result()
            except (RequestError, SuzakError):
                raise
            except Exception:
                if self.engine.check_alive():
                    self.engine.dead_error = self.engine.check_alive()
                    raise self.died() from None
                raise
        task.cancel()
        raise self.died()

    def died(self) -> RequestError:
        if self.engine.dead_error:
            return RequestError(f"the vLLM engine died ({self.engine.dead_error}); the server is stopping: restart "
                                "it", status=503)
        return RequestError("the rollout server is stopping (SIGTERM, or the process that started it is gone)",
                            status=503)


def _lifespan(engine: Engine, on_fatal: Callable[[], None] | None, liveness: _Liveness):
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        async def load() -> None:
            t = time.perf_counter()
            try:
                await engine.start()
                log.info("engine ready in %.1f s", time.perf_counter() - t)
            except Exception as e:
                engine.load_error = f"{type(e).__name__}: {e}"
                log.exception("the engine failed to load")
                if on_fatal is not None:
                    on_fatal()
                return
            await liveness.watch()

        liveness.bind()
        task = asyncio.create_task(load())
        try:
            yield
        finally:
            if not task.done():
                task.cancel()
            with contextlib.suppress(BaseException):
                await task
            await engine.shutdown()

    return lifespan


def create_app(engine: Engine, *, admin_token: str | None = None,
               on_fatal: Callable[[], None] | None = None, limits: ServerLimits | None = None) -> FastAPI:
    """The FastAPI app serving `engine`; the engine loads in the background once the app starts.

    admin_token: when set, /weights*, /sleep, /wake and /reset_prefix_cache need `Authorization: Bearer <token>`.
    on_fatal: called when the engine fails to load or dies (serve() stops the server then).
    limits: request size, prompt length, image sources and the /generate token (default: ServerLimits()).
    """
    limits = limits or ServerLimits()
    liveness = _Liveness(engine, on_fatal, limits.engine_check_s)
    app = FastAPI(title="suzak rollout server", version="1", lifespan=_lifespan(engine, on_fatal, liveness),
                  description="Generation with per-token log-probs and policy versions, and weight pushes "
                              "from the learner, for GRPO on Qwen2.5-VL and Qwen3-VL.")
    app.state.engine = engine
    app.state.limits = limits
    app.state.liveness = liveness
    app.add_middleware(BodyLimit, max_bytes=limits.max_request_bytes)
    _install_error_handlers(app, engine)
    admin = [Depends(_token_guard(admin_token))]
    user = [Depends(_token_guard(limits.generate_token, "this server (server.token_for_generate)"))]
    guard = liveness.guard

    def ready_engine() -> Engine:
        if engine.load_error:
            raise RequestError(f"the engine failed to load: {engine.load_error}", status=503)
        if engine.dead_error:
            raise liveness.died()
        if not engine.ready:
            raise RequestError("the engine is still loading; poll GET /ready", status=503)
        return engine

    def engine_state() -> str:
        return ("failed" if engine.load_error else "dead" if engine.dead_error else "ready" if engine.ready
                else "loading")

    @app.get("/health", summary="Liveness of the HTTP server: status ok (engine loading or ready), engine_dead or "
                                "engine_failed (the server is stopping)")
    async def health() -> dict:
        state = engine_state()
        if state in ("loading", "ready"):
            return {"status": "ok"}
        return {"status": f"engine_{state}", "error": engine.dead_error or engine.load_error}

    @app.get("/ready", summary="200 once the engine is loaded and alive, else 503")
    async def ready() -> dict:
        eng = ready_engine()
        return {"ready": True, "policy_version": eng.policy_version}

    @app.get("/info", response_model=wire.ModelInfo, dependencies=user,
             summary="Model, engine, policy version and limits")
    async def info() -> wire.ModelInfo:
        return ready_engine().info().model_copy(update={"max_request_bytes": limits.max_request_bytes})

    @app.post("/generate", response_model=wire.GenerateResponse, dependencies=user,
              summary="Complete chat prompts (with images); per-token log-probs and the policy version")
    async def generate(req: wire.GenerateRequest) -> wire.GenerateResponse:
        eng = ready_engine()
        start = time.perf_counter()
        info = eng.info()
        check_request(req, info, limits)
        prepared = await asyncio.to_thread(load_engine_prompts, req, info, limits.images)
        results = await guard(eng.generate(prepared, req.sampling))
        version = min((c.policy_version for r in results for c in r.completions), default=eng.policy_version)
        return wire.GenerateResponse(results=results, policy_version=version, seconds=time.perf_counter() - start)

    @app.post("/weights", response_model=wire.WeightUpdateResponse, dependencies=admin,
              summary="Load pushed weights: pause (clear caches), receive, set the version, resume")
    async def weights(req: wire.WeightUpdateRequest) -> wire.WeightUpdateResponse:
        resp = await guard(ready_engine().update_weights(req))
        log.info("weights %s v%d: %d tensors in %.2f s %s", req.transport, resp.policy_version, resp.tensors,
                 resp.seconds, {k: round(v, 3) for k, v in resp.timings.items()})
        return resp

    @app.post("/weights/init", dependencies=admin, summary="Set up a weight transport once (nccl rendezvous)")
    async def weights_init(req: wire.TransportInitRequest) -> dict:
        return await guard(ready_engine().init_transport(req))

    @app.post("/sleep", dependencies=admin, summary="Free GPU memory (vLLM sleep mode) while the learner trains")
    async def sleep(req: wire.SleepRequest | None = None) -> dict:
        return await guard(ready_engine().sleep((req or wire.SleepRequest()).level))

    @app.post("/wake", dependencies=admin, summary="Restore what /sleep freed (all, or the given tags)")
    async def wake(req: wire.WakeRequest | None = None) -> dict:
        return await guard(ready_engine().wake((req or wire.WakeRequest()).tags))

    @app.post("/reset_prefix_cache", dependencies=admin, summary="Drop the prefix-KV, multimodal and encoder caches")
    async def reset_prefix_cache() -> dict:
        return await guard(ready_engine().reset_caches())

    return app


# --------------------------------------------------------------------------- serve


def admin_token_for(host: str) -> str | None:
    """The admin token the server enforces: required off localhost, unused on it."""
    if host in LOCAL_HOSTS:
        return None
    token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        raise SuzakError(f"server.host={host} exposes the server beyond this machine: set {TOKEN_ENV} to a secret "
                         "(the learner sends it as a bearer token), or keep server.host=127.0.0.1")
    return token


def descendants(pid: int) -> list[int]:
    """Every descendant of `pid` (from /proc; empty where there is none)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _kill_children() -> None:
    for child in descendants(os.getpid()):
        with contextlib.suppress(OSError):
            os.kill(child, signal.SIGKILL)


def _exit_on_signal(signum, frame) -> None:
    raise SystemExit(128 + signum)


def _kill_children_and_exit(code: int) -> None:
    _kill_children()
    os._exit(code)


# A separate tiny process that outlives a SIGKILLed server (OOM) and then kills the engine processes it left.
_REAPER = r"""
import os, signal, sys, time
server, me = int(sys.argv[1]), os.getpid()
def stat(pid):
    with open('/proc/%d/stat' % pid) as fh:
        fields = fh.read().rsplit(')', 1)[1].split()
    return int(fields[1]), fields[19]  # parent, start time
def descendants():
    parents, started = {}, {}
    for e in os.listdir('/proc'):
        if e.isdigit():
            try:
                ppid, started[int(e)] = stat(int(e))
                parents.setdefault(ppid, []).append(int(e))
            except (OSError, IndexError, ValueError):
                pass
    out, todo = [], [server]
    while todo:
        for c in parents.get(todo.pop(), []):
            if c != me:
                out.append((c, started[c])); todo.append(c)
    return out
known = []
while os.getppid() == server:
    known = descendants()
    time.sleep(1.0)
for pid, start in known:
    try:
        if stat(pid)[1] == start:
            os.kill(pid, signal.SIGKILL)
    except (OSError, IndexError, ValueError):
        pass
"""


def _start_reaper() -> None:
    import subprocess

    if not os.path.isdir("/proc"):
        return
    with contextlib.suppress(OSError):
        subprocess.Popen([sys.executable, "-c", _REAPER, str(os.getpid())], stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True)


def _watch_process(server, parent: int | None, on_stop: Callable[[], None], grace_s: float | None = None) -> None:
    """A thread: stop the server when its parent (the learner) is gone, and make sure a stopping server exits.

    Once should_exit is set (SIGTERM, parent gone, engine dead), the server has `grace_s` seconds to shut down
    cleanly; then its children are killed and the process exits, whatever the event loop is doing."""
    if parent is not None:
        with contextlib.suppress(Exception):  # Linux: SIGTERM as soon as the parent dies
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:
            log.error("the process that started this server (pid %d) is gone: exiting", parent)
            os._exit(3)

    def run() -> None:
        while not server.should_exit:
            if parent is not None and os.getppid() != parent:
                log.error("the process that started this server (pid %d) is gone: stopping", parent)
                server.should_exit = True
                break
            time.sleep(0.5)
        on_stop()
        grace = STOP_GRACE_S if grace_s is None else grace_s
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            time.sleep(0.5)
        log.error("the server did not stop within %.0f s: killing its engine processes and exiting", grace)
        _kill_children_and_exit(3)

    threading.Thread(target=run, name="suzak-server-watch", daemon=True).start()


def serve(cfg) -> None:
    """Run the rollout server for a RunConfig until interrupted (`suzak serve`)."""
    import uvicorn

    from vllm_server.engine import build_engine

    import warnings

    from PIL import Image

    from suzak.log import setup_logging

    setup_logging()  # the learner's format; a local server's lines land in its server.log
    # Images over max_pixels are refused from their header; PIL's warning about them would only add noise.
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    token = admin_token_for(cfg.server.host)
    limits = limits_for(cfg, token)
    engine = build_engine(cfg)
    holder: dict = {}

    def stop() -> None:
        if "server" in holder:
            holder["server"].should_exit = True

    app = create_app(engine, admin_token=token, on_fatal=stop, limits=limits)
    server = uvicorn.Server(uvicorn.Config(app, host=cfg.server.host, port=cfg.server.port, log_level="info",
                                           timeout_keep_alive=75, timeout_graceful_shutdown=10))
    holder["server"] = server
    parent = os.environ.get(PARENT_ENV, "")
    _watch_process(server, int(parent) if parent.isdigit() else None, app.state.liveness.request_stop)
    _start_reaper()
    log.info("Initializing rollout server on http://%s:%d (model %s, admin token %s; limits: %s)", cfg.server.host,
             cfg.server.port, cfg.model.name_or_path, "required" if token else "off: localhost only",
             json.dumps({"max_request_mb": cfg.server.max_request_mb, "image_roots": limits.images.roots,
                         "image_urls": limits.images.allow_urls, "generate_token": bool(limits.generate_token)}))
    # uvicorn shuts down gracefully on SIGTERM and then raises the signal again under the handler it found. With
    # Python's default one the process would die right there, before the cleanup below.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        server.run()
    finally:
        # An engine process that a clean shutdown left behind goes now, not when the reaper next looks: it scans
        # once a second, so a child started less than a second before the stop could escape it.
        _kill_children()
    if engine.load_error:
        raise SuzakError(f"the rollout server stopped: the engine failed to load ({engine.load_error})")
    if engine.dead_error:
        raise SuzakError(f"the rollout server stopped: the vLLM engine died ({engine.dead_error}); see the log above")
