"""The gRPC server: `pdserve.v1.PdServe`, the standard health service and reflection.

Requests are deserialized leniently: a string field holding invalid UTF-8 (which protobuf
refuses to parse) is found by parsing again with a twin message whose strings are bytes, so
the client gets INVALID_ARGUMENT naming the field rather than a bare INTERNAL error.
"""

from __future__ import annotations

import logging
import time

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from pdserve.router.router import RequestError, Router
from pdserve.router.validate import InvalidArgument, validate
from pdserve.rpc import pdserve_pb2 as pb

log = logging.getLogger(__name__)
SERVICE = pb.DESCRIPTOR.services_by_name["PdServe"].full_name


class _BadRequest:
    def __init__(self, error: InvalidArgument):
        self.error = error


class PdServeService:
    def __init__(self, router: Router):
        self.router = router

    async def Generate(self, request, context: grpc.aio.ServicerContext):  # noqa: N802
        if isinstance(request, _BadRequest):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(request.error))
        try:
            valid = validate(request, self.router.tokenizer)
        except InvalidArgument as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.time() + remaining
        try:
            async for response in self.router.generate(valid, deadline):
                yield response
        except RequestError as e:
            await context.abort(grpc.StatusCode[e.code], str(e))
        except ValueError as e:  # a worker refused the job (e.g. more KV than it holds)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"prompt: {e}")

    async def GetClusterStatus(self, request, context):  # noqa: N802
        return self.router.status()


def _lenient_twin():
    """GenerateRequest with every string field turned into bytes."""
    proto = descriptor_pb2.FileDescriptorProto()
    pb.DESCRIPTOR.CopyToProto(proto)
    proto.name = "pdserve/v1/lenient.proto"
    proto.package = "pdserve.v1.lenient"
    proto.ClearField("service")
    for message in proto.message_type:
        for f in message.field:
            if f.type == f.TYPE_STRING:
                f.type = f.TYPE_BYTES
            if f.type_name.startswith(".pdserve.v1."):
                f.type_name = ".pdserve.v1.lenient." + f.type_name.removeprefix(".pdserve.v1.")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(
        pool.FindMessageTypeByName("pdserve.v1.lenient.GenerateRequest"))


_Lenient = _lenient_twin()


def _bad_utf8_field(message, path: str = "") -> str | None:
    for f, value in message.ListFields():
        name = f"{path}{f.name}"
        values = value if f.is_repeated else [value]
        for i, v in enumerate(values):
            where = f"{name}[{i}]" if f.is_repeated else name
            if isinstance(v, bytes):
                try:
                    v.decode("utf-8")
                except UnicodeDecodeError:
                    return where
            elif hasattr(v, "ListFields"):
                found = _bad_utf8_field(v, where + ".")
                if found:
                    return found
    return None


def deserialize_generate_request(data: bytes):
    try:
        return pb.GenerateRequest.FromString(data)
    except DecodeError as e:
        try:
            field = _bad_utf8_field(_Lenient.FromString(data))
        except DecodeError:
            field = None
        if field is None:
            return _BadRequest(InvalidArgument("request", f"not a GenerateRequest: {e}"))
        return _BadRequest(InvalidArgument(field, "is not valid UTF-8"))


def add_service(server: grpc.aio.Server, router: Router) -> None:
    service = PdServeService(router)
    handlers = {
        "Generate": grpc.unary_stream_rpc_method_handler(
            service.Generate, request_deserializer=deserialize_generate_request,
            response_serializer=pb.GenerateResponse.SerializeToString),
        "GetClusterStatus": grpc.unary_unary_rpc_method_handler(
            service.GetClusterStatus,
            request_deserializer=pb.GetClusterStatusRequest.FromString,
            response_serializer=pb.ClusterStatus.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


async def start_server(router: Router, address: str = "127.0.0.1:0") -> tuple[grpc.aio.Server,
                                                                             int]:
    """Serve PdServe, health and reflection on `address`; (server, bound port)."""
    server = grpc.aio.server()
    add_service(server, router)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME), server)
    port = server.add_insecure_port(address)
    await server.start()
    for name in ("", SERVICE):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, port
