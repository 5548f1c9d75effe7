"""The morph web page: a Starlette app that is a client of the running service.

It serves one static page (web/static/) and two endpoints: `GET /api/limits` (what the form may
ask for, from the service's sources of truth) and `POST /api/morph` (the form), answered as a
stream of server-sent events fed by one `MorphClient.morph_stream` call. The model never runs
here: no torch, no core; the service token stays in this process (a `TokenSource`).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from morph_protocol.keyfile import TokenError, TokenSource
from client.morph_client import DEFAULT_MAX_MESSAGE_MB, DEFAULT_MODEL, DEFAULT_TARGET, MorphClient, MorphClientError

from . import events
from .form import FormError, MorphForm, read_form
from .limits import PageLimits

logger = logging.getLogger("web")
STATIC_DIR = Path(__file__).resolve().parent / "static"
KEEPALIVE_S = 10.0


@dataclass
class WebSettings:
    """Where the service is and how this process talks to it."""

    limits: PageLimits
    target: str = DEFAULT_TARGET
    model: str = DEFAULT_MODEL
    tokens: TokenSource | None = None
    deadline_s: float = 1800.0
    retries: int = 2
    max_message_mb: int = DEFAULT_MAX_MESSAGE_MB


async def morph_stream(settings: WebSettings, form: MorphForm):
    """SSE chunks of one streamed morph. The gRPC call runs in a worker thread and hands its
    messages over through a queue; when the browser goes away the generator is closed, which
    closes the channel and so cancels the call (the guard then stops the morph)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[bytes | None] = asyncio.Queue()
    client = MorphClient(settings.target, settings.model, tokens=settings.tokens or TokenSource(),
                         retries=settings.retries, max_message_mb=settings.max_message_mb)

    def emit(chunk: bytes | None) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, chunk)
        except RuntimeError:  # the event loop is gone (server shutting down)
            pass

    def run() -> None:
        try:
            result = client.morph_stream(
                form.images, form.prompts, form.options, deadline_s=settings.deadline_s,
                on_event=lambda message: emit(events.for_message(message)),
                loras=form.loras if any(lora is not None for lora in form.loras) else None,
            )
            emit(events.for_result(result))
        except MorphClientError as error:
            logger.info("morph refused or failed: %s", error)
            emit(events.for_client_error(error))
        except TokenError as error:
            logger.error("no token for the morph service: %s", error)
            emit(events.error_event("UNAUTHENTICATED", "the web page has no valid token for the morph "
                                    "service; its operator must fix the key file (see the web log)"))
        except Exception:  # anything else: logged here, never shown as a trace in the page
            logger.exception("morph failed in the web process")
            emit(events.error_event("INTERNAL", "the web page failed to pass the morph on (see its log)"))
        finally:
            emit(None)

    worker = loop.run_in_executor(None, run)
    try:
        yield events.sse(events.EVENT_ACCEPTED, {"images": len(form.images)})
        while True:
            try:
                chunk = await asyncio.wait_for(queue.get(), KEEPALIVE_S)
            except TimeoutError:
                yield events.KEEPALIVE
                continue
            if chunk is None:
                break
            yield chunk
    finally:
        client.close()
        if not worker.done():
            logger.info("the browser left before the morph ended: call cancelled")


def create_app(settings: WebSettings) -> Starlette:
    async def index(request: Request) -> Response:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    async def limits(request: Request) -> Response:
        return JSONResponse(settings.limits.to_dict())

    async def morph(request: Request) -> Response:
        try:
            form = await read_form(request, settings.limits)
        except FormError as error:
            return JSONResponse({"code": "REFUSED", "message": error.message}, status_code=error.status)
        except HTTPException as error:  # the multipart parser's own refusals
            return JSONResponse({"code": "REFUSED", "message": str(error.detail)}, status_code=error.status_code)
        return StreamingResponse(
            morph_stream(settings, form), media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    return Starlette(routes=[
        Route("/", index),
        Route("/api/limits", limits),
        Route("/api/morph", morph, methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
    ])
