"""gRPC server reflection, v1 and v1alpha, serving the proto comments too (`grpcurl describe` documents).

grpcio-reflection's servicer answers from a DescriptorPool, and a pool drops source info (the comments)
from every file it holds; it also offers only v1alpha. So this servicer answers with the
FileDescriptorProtos as protoc wrote them (lingua_sdk/_proto/scheduler.binpb, made by scripts/gen_protos
with --include_source_info) and uses a pool only to find which file defines a symbol. The v1 and
v1alpha protocols are wire-identical (v1 is v1alpha renamed), so one servicer, built on grpcio-reflection's
v1alpha messages, is registered under both service names.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from importlib import resources
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FileDescriptor
from grpc_reflection.v1alpha import reflection_pb2 as rpb

V1ALPHA = "grpc.reflection.v1alpha.ServerReflection"
V1 = "grpc.reflection.v1.ServerReflection"
SERVICE_NAMES = (V1, V1ALPHA)


def contract_files() -> list[descriptor_pb2.FileDescriptorProto]:
    """The scheduler's proto files and their imports, with source info (the package data of the SDK)."""
    raw = resources.files("lingua_sdk._proto").joinpath("scheduler.binpb").read_bytes()
    return list(descriptor_pb2.FileDescriptorSet.FromString(raw).file)


def _v1_file() -> descriptor_pb2.FileDescriptorProto:
    """grpc/reflection/v1/reflection.proto: v1alpha's file under the v1 package (the messages are
    identical), so `describe grpc.reflection.v1.ServerReflection` works; grpcio-reflection ships no v1."""
    proto = _copy(rpb.DESCRIPTOR)
    proto.name = "grpc/reflection/v1/reflection.proto"  # its name upstream
    proto.package = proto.package.replace("v1alpha", "v1")
    proto.options.Clear()  # its java/objc options name v1alpha
    for message in proto.message_type:
        for field in message.field:
            if field.HasField("type_name"):
                field.type_name = field.type_name.replace(".v1alpha.", ".v1.")
    for service in proto.service:
        for method in service.method:
            method.input_type = method.input_type.replace(".v1alpha.", ".v1.")
            method.output_type = method.output_type.replace(".v1alpha.", ".v1.")
    return proto


class ReflectionServicer:
    """Answers list_services, file_by_filename, file_containing_symbol, file_containing_extension and
    all_extension_numbers_of_type from the given files (each answer carries a file and its imports)."""

    def __init__(self, service_names: Iterable[str], files: Iterable[descriptor_pb2.FileDescriptorProto]) -> None:
        self._services = sorted(service_names)
        self._files = {f.name: f for f in files}
        self._pool = descriptor_pool.DescriptorPool()
        for name in self._files:
            self._add(name, set())

    def _add(self, name: str, added: set[str]) -> None:
        """Add a file to the pool after its imports (a pool refuses a file whose imports it lacks)."""
        if name in added:
            return
        added.add(name)
        for dep in self._files[name].dependency:
            self._add(dep, added)
        try:
            self._pool.FindFileByName(name)
        except KeyError:
            self._pool.Add(self._files[name])

    def _answer(self, request: rpb.ServerReflectionRequest, file: FileDescriptor | None) -> rpb.ServerReflectionResponse:
        if file is None or file.name not in self._files:
            return self._error(request, grpc.StatusCode.NOT_FOUND)
        names: list[str] = []
        pending = [file.name]
        while pending:  # the file and its transitive imports, each once
            name = pending.pop()
            if name not in names:
                names.append(name)
                pending.extend(self._files[name].dependency)
        return rpb.ServerReflectionResponse(original_request=request, file_descriptor_response=rpb.FileDescriptorResponse(
            file_descriptor_proto=[self._files[n].SerializeToString() for n in names]))

    @staticmethod
    def _error(request: rpb.ServerReflectionRequest, code: grpc.StatusCode) -> rpb.ServerReflectionResponse:
        return rpb.ServerReflectionResponse(original_request=request, error_response=rpb.ErrorResponse(
            error_code=code.value[0], error_message=str(code.value[1])))

    def _find(self, lookup: Any, *args: Any) -> Any:
        try:
            return lookup(*args)
        except KeyError:
            return None

    def respond(self, request: rpb.ServerReflectionRequest) -> rpb.ServerReflectionResponse:
        kind = request.WhichOneof("message_request")
        if kind == "list_services":
            return rpb.ServerReflectionResponse(original_request=request, list_services_response=rpb.ListServiceResponse(
                service=[rpb.ServiceResponse(name=name) for name in self._services]))
        if kind == "file_by_filename":
            return self._answer(request, self._find(self._pool.FindFileByName, request.file_by_filename))
        if kind == "file_containing_symbol":
            return self._answer(request, self._find(self._pool.FindFileContainingSymbol, request.file_containing_symbol))
        if kind == "file_containing_extension":
            ext = request.file_containing_extension
            message = self._find(self._pool.FindMessageTypeByName, ext.containing_type)
            extension = message and self._find(self._pool.FindExtensionByNumber, message, ext.extension_number)
            return self._answer(request, extension.file if extension else None)
        if kind == "all_extension_numbers_of_type":
            message = self._find(self._pool.FindMessageTypeByName, request.all_extension_numbers_of_type)
            if message is None:
                return self._error(request, grpc.StatusCode.NOT_FOUND)
            numbers = rpb.ExtensionNumberResponse(
                base_type_name=message.full_name,
                extension_number=sorted(e.number for e in self._pool.FindAllExtensions(message)))
            return rpb.ServerReflectionResponse(original_request=request, all_extension_numbers_response=numbers)
        return self._error(request, grpc.StatusCode.INVALID_ARGUMENT)

    async def ServerReflectionInfo(self, request_iterator: AsyncIterator[rpb.ServerReflectionRequest],
                                   context: Any) -> AsyncIterator[rpb.ServerReflectionResponse]:
        async for request in request_iterator:
            yield self.respond(request)


def enable(server: grpc.aio.Server, service_names: Iterable[str], files: Iterable[FileDescriptor]) -> None:
    """Serve reflection v1 and v1alpha on `server`: `service_names` plus both reflection services, the
    contract's files with their comments, and `files` (e.g. health's, from its generated module)."""
    protos = [*contract_files(), *(_copy(f) for f in files), _copy(rpb.DESCRIPTOR), _v1_file()]
    servicer = ReflectionServicer([*service_names, *SERVICE_NAMES], _unique(protos))
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=rpb.ServerReflectionRequest.FromString,
        response_serializer=rpb.ServerReflectionResponse.SerializeToString,
    )
    for name in SERVICE_NAMES:
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, {"ServerReflectionInfo": handler}),))


def _copy(file: FileDescriptor) -> descriptor_pb2.FileDescriptorProto:
    proto = descriptor_pb2.FileDescriptorProto()
    file.CopyToProto(proto)
    return proto


def _unique(files: list[descriptor_pb2.FileDescriptorProto]) -> list[descriptor_pb2.FileDescriptorProto]:
    """The first of each name: the contract's copies (with comments) win over generated-module ones."""
    seen: dict[str, descriptor_pb2.FileDescriptorProto] = {}
    for f in files:
        seen.setdefault(f.name, f)
    return list(seen.values())
