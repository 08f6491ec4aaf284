"""The OpenAI-compatible HTTP API of one router (FastAPI), on the gRPC API's request path.

A request's life here:
1. READ       the body, up to the router's request size limit (413 past it), as JSON.
2. PARSED     into the endpoint's schema (router.http.schemas), off the event loop in the
              router's Intake: a field of the wrong type, or one asking for what pdserve
              does not serve, is a 400 naming it; a model other than the one served, 404.
3. VALIDATED  as a gRPC `GenerateRequest` (router.http.convert) by the same Intake as the
              gRPC server's (router.intake): 400 naming the field, 429 when the intake is
              full. What ends here is reported to the router's observers (router.observe).
4. SERVED     by `Router.generate`, as over gRPC: its status names map to HTTP statuses
              (router.http.errors). A streamed request waits for its first token before
              it answers, so a refusal at admission (429) or no worker (503) still gets its
              status; after that an error is an `error` event, then `data: [DONE]`.
5. ENDED      a client that disconnects cancels the request (router.http.disconnect): the
              router aborts it on both workers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from pdserve import __version__
from pdserve.protocol import InvalidField
from pdserve.router.errors import RequestError
from pdserve.router.health import DECODERS
from pdserve.router.http.convert import chat_request, client_field, completion_request
from pdserve.router.http.disconnect import EventStream, unless_disconnected
from pdserve.router.http.errors import PAYLOAD_TOO_LARGE, ApiError, invalid
from pdserve.router.http.responses import DONE, Body, Endpoint, event, sse
from pdserve.router.http.schemas import ChatCompletionRequest, CompletionRequest, Unsupported
from pdserve.router.intake import IntakeFull
from pdserve.router.metrics import CONTENT_TYPE_LATEST, RouterMetrics
from pdserve.router.observe import RequestOutcome, RequestRecord, notify
from pdserve.router.router import Router
from pdserve.rpc import pdserve_pb2 as pb

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServedModel:
    name: str  # what clients pass as `model` and /v1/models lists
    max_model_len: int
    created: int


class OpenAIApi:
    """The endpoints' handlers over one router; they run on the router's event loop."""

    def __init__(self, router: Router, metrics: RouterMetrics, model_name: str):
        self.router = router
        self.metrics = metrics
        self.intake = router.intake
        self.model = ServedModel(model_name, router.tokenizer.limits.max_model_len,
                                 int(time.time()))
        self.max_body_bytes = router.config.input_limits.max_request_bytes

    # -- generation ----------------------------------------------------------------------------

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, Endpoint.COMPLETIONS)

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, Endpoint.CHAT)

    async def _generate(self, request: Request, endpoint: Endpoint) -> Response:
        arrival = time.time()
        request_id = f"{endpoint.id_prefix}-{uuid.uuid4().hex}"
        try:
            body = await self._parse(request, endpoint)
            valid = await self._validate(body, endpoint, request_id)
        except ApiError as e:
            outcome = RequestOutcome.REFUSED if e.status.status == 429 else \
                RequestOutcome.INVALID
            notify(self.router.observers, RequestRecord(
                request_id, outcome, arrival, time.time(), 0, 0, code=e.code, error=str(e)))
            return e.response()
        shape = Body(endpoint, request_id, self.model.name)
        responses = self.router.generate(valid)
        field = "prompt" if endpoint is Endpoint.COMPLETIONS else "messages"
        try:
            if not body.stream:
                result = await unless_disconnected(request, _collect(responses, field))
                if result is None:  # the client left: the router aborted the request
                    return Response(status_code=499)
                text, final = result
                return JSONResponse(shape.whole(text, final))
            first = await unless_disconnected(request, _first_response(responses, field))
        except ApiError as e:
            return e.response()
        if first is None:
            return Response(status_code=499)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return EventStream(_events(shape, first, responses, field, include_usage))

    async def _parse(self, request: Request, endpoint: Endpoint
                     ) -> CompletionRequest | ChatCompletionRequest:
        raw = bytearray()
        async for part in request.stream():
            raw += part
            if len(raw) > self.max_body_bytes:
                raise ApiError("INVALID_ARGUMENT", f"the request body exceeds "
                               f"{self.max_body_bytes} bytes", status=PAYLOAD_TOO_LARGE)
        try:  # off the event loop, as the gRPC server's validation (router.intake)
            body = await self.intake.run(_decode, bytes(raw), endpoint, size=len(raw))
        except IntakeFull as e:
            raise ApiError("RESOURCE_EXHAUSTED", str(e)) from e
        if body.model is not None and body.model != self.model.name:
            raise ApiError("NOT_FOUND", f"The model `{body.model}` does not exist; this "
                           f"server serves `{self.model.name}`", param="model",
                           body_code="model_not_found")
        return body

    async def _validate(self, body, endpoint: Endpoint, request_id: str):
        try:
            if endpoint is Endpoint.COMPLETIONS:
                req = completion_request(body, request_id)
            else:
                req = chat_request(body, request_id, self.model.max_model_len)
            return await self.intake.validate(req)
        except Unsupported as e:
            raise invalid(e.field, str(e).removeprefix(f"{e.field}: ")) from e
        except InvalidField as e:
            raise invalid(client_field(e.field, body), e.problem) from e
        except IntakeFull as e:
            raise ApiError("RESOURCE_EXHAUSTED", str(e)) from e

    # -- the rest ------------------------------------------------------------------------------

    async def models(self) -> dict:
        return {"object": "list", "data": [{
            "id": self.model.name, "object": "model", "created": self.model.created,
            "owned_by": "pdserve", "root": self.model.name,
            "max_model_len": self.model.max_model_len}]}

    async def health(self) -> Response:
        """200 while a worker that can decode is live (the gRPC health service's SERVING),
        503 while none is."""
        live = {w.record.role for w in self.router.view.workers.values()}
        if any(role in live for role in DECODERS):
            return Response(status_code=200)
        return ApiError("UNAVAILABLE", "no live decode or colocated worker").response()

    async def version(self) -> dict:
        return {"version": __version__}

    async def prometheus(self) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE_LATEST)


def build_app(router: Router, metrics: RouterMetrics, model_name: str) -> FastAPI:
    api = OpenAIApi(router, metrics, model_name)
    app = FastAPI(title="pdserve", version=__version__, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.add_api_route("/v1/completions", api.completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", api.chat_completions, methods=["POST"])
    app.add_api_route("/v1/models", api.models, methods=["GET"])
    app.add_api_route("/health", api.health, methods=["GET"])
    app.add_api_route("/version", api.version, methods=["GET"])
    app.add_api_route("/metrics", api.prometheus, methods=["GET"])
    security = router.config.security
    if security.needs_key:
        @app.middleware("http")
        async def require_key(request: Request, call_next):
            path = request.url.path
            if (path == "/health" or (path == "/metrics" and security.public_metrics)
                    or security.accepts(request.headers.get("authorization"))):
                return await call_next(request)
            return ApiError("UNAUTHENTICATED", "missing or invalid API key",
                            body_code="invalid_api_key").response()
    return app


def _decode(raw: bytes, endpoint: Endpoint) -> CompletionRequest | ChatCompletionRequest:
    """The endpoint's request from its JSON body; raises ApiError."""
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise invalid("body", f"is not JSON: {e}") from e
    if not isinstance(data, dict):
        raise invalid("body", "must be a JSON object")
    schema = CompletionRequest if endpoint is Endpoint.COMPLETIONS else ChatCompletionRequest
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise _first_error(e) from e


def _first_error(e: ValidationError) -> ApiError:
    """A 400 naming the first field pydantic refused, as JSON spells it (without the tags
    pydantic puts in a location for the member of a union it tried: `str`, `list[int]`).
    Of a union's errors, the deepest: `[1, "x"]` for a prompt is a bad `prompt[1]`."""
    errors = e.errors()
    err = max((x for x in errors if x["loc"][:1] == errors[0]["loc"][:1]),
              key=lambda x: len(x["loc"]))
    field = ""
    for part in err["loc"]:
        if isinstance(part, int):
            field += f"[{part}]"
        elif part not in _UNION_TAGS and not any(c in part for c in "[-"):
            field += f".{part}" if field else part
    return invalid(field or "body", err["msg"])


_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _api_error(e: Exception, field: str) -> ApiError:
    if isinstance(e, RequestError):
        param = field if e.code == "INVALID_ARGUMENT" else None
        return ApiError(e.code, str(e), param=param)
    # a worker refused the job (e.g. more KV than it holds), as the gRPC server reports it
    return invalid(field, str(e))


async def _collect(responses: AsyncIterator[pb.GenerateResponse],
                   field: str) -> tuple[str, pb.FinalResponse]:
    text = []
    try:
        async for response in responses:
            if response.HasField("final"):
                return "".join(text), response.final
            text.append(response.chunk.text)
    except (RequestError, ValueError) as e:
        raise _api_error(e, field) from e
    raise ApiError("INTERNAL", "the router ended the request without its final message")


async def _first_response(responses: AsyncIterator[pb.GenerateResponse],
                          field: str) -> pb.GenerateResponse:
    try:
        return await anext(responses)
    except (RequestError, ValueError) as e:
        raise _api_error(e, field) from e


async def _events(shape: Body, first: pb.GenerateResponse,
                  responses: AsyncIterator[pb.GenerateResponse], field: str,
                  include_usage: bool) -> AsyncIterator[bytes]:
    """The stream's events from its first response on; an error after it is an `error`
    event, then `data: [DONE]`."""

    async def resumed():
        yield first
        async for response in responses:
            yield response

    stream = sse(shape, resumed(), include_usage)
    # closed innermost last: the router's generator ends (and aborts) however this ends
    async with contextlib.aclosing(responses), contextlib.aclosing(stream):
        try:
            async for data in stream:
                yield data
        except (RequestError, ValueError) as e:
            yield event(_api_error(e, field).body())
            yield DONE

