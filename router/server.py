"""The gRPC server: `pdserve.v1.PdServe`, the standard health service and reflection.

A request's bytes are parsed on the event loop (protobuf's C parser: milliseconds for the
largest message gRPC lets in, `InputLimits.max_request_bytes`); everything else the front
door does runs off it (router.intake). Bytes protobuf refuses (invalid UTF-8 in a string,
malformed encoding) are not an error of the transport: they are diagnosed off the loop too
(router.wire), so the client gets INVALID_ARGUMENT naming the field rather than a bare
INTERNAL error.

Traces: a client's W3C `traceparent` (invocation metadata) puts the request's spans in the
client's trace (router.tracing); every request the router takes answers with the
`traceparent` of its request span in the trailing metadata, so a client can find its trace.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from pdserve.protocol import WorkerRole
from pdserve.router.errors import RequestError
from pdserve.router.health import HealthReporter
from pdserve.router.intake import IntakeFull
from pdserve.router.router import Router
from pdserve.router.security import ApiSecurity
from pdserve.router.tracecontext import TRACEPARENT, TraceContext
from pdserve.router.validate import InvalidArgument
from pdserve.router.wire import diagnose
from pdserve.rpc import pdserve_pb2 as pb

log = logging.getLogger(__name__)
SERVICE = pb.DESCRIPTOR.services_by_name["PdServe"].full_name


class _Undecodable:
    """Bytes that protobuf refused, kept for diagnosis off the event loop."""

    def __init__(self, data: bytes):
        self.data = data


class PdServeService:
    def __init__(self, router: Router):
        self.router = router
        self.intake = router.intake

    async def Generate(self, request, context: grpc.aio.ServicerContext):  # noqa: N802
        try:
            if isinstance(request, _Undecodable):
                raise await self.intake.run(diagnose, request.data, size=len(request.data))
            valid = await self.intake.validate(request)
        except InvalidArgument as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except IntakeFull as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except Exception:  # noqa: BLE001 - a bug of ours: logged, its text stays inside
            log.exception("validating a request failed")
            await context.abort(grpc.StatusCode.INTERNAL,
                                "the router failed to read the request (see its log)")
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.time() + remaining
        trace = TraceContext.from_metadata(context.invocation_metadata())
        context.set_trailing_metadata(((TRACEPARENT, trace.traceparent()),))
        try:
            async for response in self.router.generate(valid, deadline, trace):
                yield response
        except RequestError as e:
            await context.abort(grpc.StatusCode[e.code], str(e))
        except ValueError as e:  # a worker refused the job (e.g. more KV than it holds)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"prompt: {e}")

    async def GetClusterStatus(self, request, context):  # noqa: N802
        if isinstance(request, _Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request: is not a "
                                "serialized pdserve.v1.GetClusterStatusRequest")
        return self.router.status()


def deserialize_generate_request(data: bytes):
    try:
        return pb.GenerateRequest.FromString(data)
    except DecodeError:
        return _Undecodable(data)


def _deserialize_status_request(data: bytes):
    try:
        return pb.GetClusterStatusRequest.FromString(data)
    except DecodeError:
        return _Undecodable(data)


def add_service(server: grpc.aio.Server, router: Router) -> None:
    service = PdServeService(router)
    handlers = {
        "Generate": grpc.unary_stream_rpc_method_handler(
            service.Generate, request_deserializer=deserialize_generate_request,
            response_serializer=pb.GenerateResponse.SerializeToString),
        "GetClusterStatus": grpc.unary_unary_rpc_method_handler(
            service.GetClusterStatus,
            request_deserializer=_deserialize_status_request,
            response_serializer=pb.ClusterStatus.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


class KeyCheck(grpc.aio.ServerInterceptor):
    """Every call but the open services' needs an accepted API key (router.security)."""

    def __init__(self, security: ApiSecurity):
        self.security = security

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or self.security.check(details.method,
                                                  details.invocation_metadata or ()):
            return handler
        return _refusing(handler)


def _refusing(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of `handler`'s kind that answers UNAUTHENTICATED and nothing more."""
    async def refuse(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid API key")

    kinds = {"unary_unary": grpc.unary_unary_rpc_method_handler,
             "unary_stream": grpc.unary_stream_rpc_method_handler,
             "stream_unary": grpc.stream_unary_rpc_method_handler,
             "stream_stream": grpc.stream_stream_rpc_method_handler}
    kind = next(k for k in kinds if getattr(handler, k) is not None)
    return kinds[kind](refuse, request_deserializer=handler.request_deserializer,
                       response_serializer=handler.response_serializer)


async def start_server(router: Router, address: str = "127.0.0.1:0",
                       roles: Iterable[WorkerRole] = ()) -> tuple[grpc.aio.Server, int]:
    """Serve PdServe, health and reflection on `address`; (server, bound port). Health
    follows the router's view (router.health); `roles`: the deployment's worker roles,
    each reported under its own health name too. API keys and TLS follow
    `router.config.security` (router.security)."""
    limit = router.config.input_limits.max_request_bytes
    security = router.config.security
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", limit)],
                             interceptors=[KeyCheck(security)] if security.needs_key else [])
    add_service(server, router)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME), server)
    reporter = HealthReporter(health_servicer, router.view, SERVICE, roles,
                              router.config.refresh_s)
    await reporter.update()  # before a client can ask
    if security.tls:
        credentials = grpc.ssl_server_credentials(
            [(security.tls_private_key, security.tls_cert_chain)],
            root_certificates=security.client_ca or None,
            require_client_auth=bool(security.client_ca))
        port = server.add_secure_port(address, credentials)
    else:
        port = server.add_insecure_port(address)
    await server.start()
    reporter.start(server)
    return server, port
