"""The rollout server's HTTP API (FastAPI), around a generation engine (vLLM's AsyncLLM in engine.py).

    suzak serve --config configs/qwen25vl_7b_clevr.yaml            # binds server.host:server.port
    curl localhost:8000/info                                         # OpenAPI: localhost:8000/docs

Routes: GET /health, /ready, /info; POST /generate; admin: POST /weights, /weights/init, /sleep, /wake,
/reset_prefix_cache. Every request is validated against suzak/wire.py before the engine sees it: a bad body is
a 422 and a bad image or an over-long prompt a 400, as JSON {"error", "field", "detail"}; the server keeps serving.

Security: the default bind is 127.0.0.1. Bound anywhere else, the admin routes need the header
`Authorization: Bearer $SUZAK_SERVER_TOKEN`, and the server refuses to start without that variable. The ipc
transport carries pickled CUDA IPC handles, and unpickling runs code: keep such a server on an internal network
only, reachable by the learner alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from suzak import wire
from suzak.errors import SuzakError
from vllm_server.engine import Engine, PreparedPrompt, RequestError, hf_messages

log = logging.getLogger("suzak.server")

TOKEN_ENV = "SUZAK_SERVER_TOKEN"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def _error(status: int, message: str, field: str | None = None, detail: str | None = None) -> JSONResponse:
    body = wire.ErrorResponse(error=message, field=field, detail=detail).model_dump(exclude_none=True)
    return JSONResponse(body, status_code=status)


def _loc_to_field(loc: tuple) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path"):
        parts = parts[1:]
    return ".".join(parts)


# --------------------------------------------------------------------------- images


def _load_prompt_images(index: int, prompt: wire.Prompt, info: wire.ModelInfo) -> PreparedPrompt:
    from suzak.images import check_pixels, load_image

    images = []
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
            try:
                img = load_image(part.image, field=f"{where}.image")
                check_pixels(img, info.max_pixels, field=f"{where}.image")
            except RequestError:
                raise
            except SuzakError as e:
                raise RequestError(str(e), field=f"{where}.image") from None
            images.append(img)
    if len(images) > info.max_images_per_prompt:
        raise RequestError(f"prompt {index} has {len(images)} images; the server takes at most "
                           f"{info.max_images_per_prompt} per prompt", field=f"prompts.{index}")
    return PreparedPrompt(messages=hf_messages(prompt), images=images)


def prepare_prompts(req: wire.GenerateRequest, info: wire.ModelInfo) -> list[PreparedPrompt]:
    """Load and check every image of a request (400 naming the field of the first bad one)."""
    if len(req.prompts) < 4:
        return [_load_prompt_images(i, p, info) for i, p in enumerate(req.prompts)]
    # PNG/JPEG decoding releases the GIL: a few threads cut a 64-image batch's decode time several-fold.
    with ThreadPoolExecutor(max_workers=min(8, len(req.prompts))) as pool:
        return list(pool.map(lambda ip: _load_prompt_images(ip[0], ip[1], info), enumerate(req.prompts)))


# --------------------------------------------------------------------------- the app


def _admin_guard(token: str | None) -> Callable:
    async def check(request: Request) -> None:
        if token is None:
            return
        header = request.headers.get("authorization", "")
        given = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else ""
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise RequestError(f"this route needs 'Authorization: Bearer <token>' with the server's {TOKEN_ENV} "
                               "(RolloutClient(token=...) or the SUZAK_SERVER_TOKEN variable sends it)", status=401)
    return check


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        detail = "; ".join(f"{_loc_to_field(e['loc']) or 'body'}: {e['msg']}" for e in errors)
        field = _loc_to_field(first["loc"]) or None
        return _error(422, f"invalid request: {field or 'body'}: {first['msg']}", field=field, detail=detail)

    @app.exception_handler(RequestError)
    async def _request_error(_: Request, exc: RequestError) -> JSONResponse:
        return _error(exc.status, str(exc), field=exc.field)

    @app.exception_handler(SuzakError)
    async def _suzak_error(_: Request, exc: SuzakError) -> JSONResponse:
        return _error(400, str(exc))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        # Starlette re-raises after this answer, so uvicorn logs the traceback.
        return _error(500, f"server error: {type(exc).__name__}: {exc}", detail="see the server log")


def _lifespan(engine: Engine, on_fatal: Callable[[], None] | None):
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
               on_fatal: Callable[[], None] | None = None) -> FastAPI:
    """The FastAPI app serving `engine`; the engine loads in the background once the app starts.

    admin_token: when set, /weights*, /sleep, /wake and /reset_prefix_cache need `Authorization: Bearer <token>`.
    on_fatal: called when the engine fails to load (serve() stops the server then).
    """
    app = FastAPI(title="suzak rollout server", version="1", lifespan=_lifespan(engine, on_fatal),
                  description="Generation with per-token log-probs and policy versions, and weight pushes "
                              "from the learner, for GRPO on Qwen2.5-VL.")
    app.state.engine = engine
    _install_error_handlers(app)
    admin = [Depends(_admin_guard(admin_token))]

    def ready_engine() -> Engine:
        if engine.load_error:
            raise RequestError(f"the engine failed to load: {engine.load_error}", status=503)
        if not engine.ready:
            raise RequestError("the engine is still loading; poll GET /ready", status=503)
        return engine

    @app.get("/health", summary="Liveness: the HTTP server answers (the engine may still be loading)")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready", summary="200 once the engine is loaded, else 503")
    async def ready() -> dict:
        eng = ready_engine()
        return {"ready": True, "policy_version": eng.policy_version}

    @app.get("/info", response_model=wire.ModelInfo, summary="Model, engine, policy version and limits")
    async def info() -> wire.ModelInfo:
        return ready_engine().info()

    @app.post("/generate", response_model=wire.GenerateResponse,
              summary="Complete chat prompts (with images); per-token log-probs and the policy version")
    async def generate(req: wire.GenerateRequest) -> wire.GenerateResponse:
        eng = ready_engine()
        start = time.perf_counter()
        prepared = await asyncio.to_thread(prepare_prompts, req, eng.info())
        results = await eng.generate(prepared, req.sampling)
        version = min((c.policy_version for r in results for c in r.completions), default=eng.policy_version)
        return wire.GenerateResponse(results=results, policy_version=version, seconds=time.perf_counter() - start)

    @app.post("/weights", response_model=wire.WeightUpdateResponse, dependencies=admin,
              summary="Load pushed weights: pause (clear caches), receive, set the version, resume")
    async def weights(req: wire.WeightUpdateRequest) -> wire.WeightUpdateResponse:
        resp = await ready_engine().update_weights(req)
        log.info("weights %s v%d: %d tensors in %.2f s %s", req.transport, resp.policy_version, resp.tensors,
                 resp.seconds, {k: round(v, 3) for k, v in resp.timings.items()})
        return resp

    @app.post("/weights/init", dependencies=admin, summary="Set up a weight transport once (nccl rendezvous)")
    async def weights_init(req: wire.TransportInitRequest) -> dict:
        return await ready_engine().init_transport(req)

    @app.post("/sleep", dependencies=admin, summary="Free GPU memory (vLLM sleep mode) while the learner trains")
    async def sleep(req: wire.SleepRequest | None = None) -> dict:
        return await ready_engine().sleep((req or wire.SleepRequest()).level)

    @app.post("/wake", dependencies=admin, summary="Restore what /sleep freed (all, or the given tags)")
    async def wake(req: wire.WakeRequest | None = None) -> dict:
        return await ready_engine().wake((req or wire.WakeRequest()).tags)

    @app.post("/reset_prefix_cache", dependencies=admin, summary="Drop the prefix-KV, multimodal and encoder caches")
    async def reset_prefix_cache() -> dict:
        return await ready_engine().reset_caches()

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


def serve(cfg) -> None:
    """Run the rollout server for a RunConfig until interrupted (`suzak serve`)."""
    import uvicorn

    from vllm_server.engine import build_engine

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    token = admin_token_for(cfg.server.host)
    engine = build_engine(cfg)
    holder: dict = {}

    def stop() -> None:
        if "server" in holder:
            holder["server"].should_exit = True

    app = create_app(engine, admin_token=token, on_fatal=stop)
    server = uvicorn.Server(uvicorn.Config(app, host=cfg.server.host, port=cfg.server.port, log_level="info",
                                           timeout_keep_alive=75))
    holder["server"] = server
    log.info("Initializing rollout server on http://%s:%d (model %s, admin token %s)", cfg.server.host,
             cfg.server.port, cfg.model.name_or_path, "required" if token else "off: localhost only")
    server.run()
    if engine.load_error:
        raise SuzakError(f"the rollout server stopped: the engine failed to load ({engine.load_error})")
