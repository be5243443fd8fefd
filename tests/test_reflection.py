"""gRPC reflection (server/reflection.py): v1 and v1alpha, serving the proto comments."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection_pb2 as rpb
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from lingua_scheduler.server.app import App

SUBMIT_COMMENT = "Submits one or more jobs. Idempotent per job"
SERVICES = {"lingua.scheduler.v1.Scheduler", "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"}


async def ask(channel: grpc.aio.Channel, version: str,
              *requests: rpb.ServerReflectionRequest) -> list[rpb.ServerReflectionResponse]:
    """One reflection stream of the given protocol version (v1 and v1alpha are wire-identical)."""
    call = channel.stream_stream(f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
                                 request_serializer=rpb.ServerReflectionRequest.SerializeToString,
                                 response_deserializer=rpb.ServerReflectionResponse.FromString)(iter(requests))
    return [reply async for reply in call]


def files_of(reply: rpb.ServerReflectionResponse) -> dict[str, descriptor_pb2.FileDescriptorProto]:
    protos = (descriptor_pb2.FileDescriptorProto.FromString(raw) for raw in reply.file_descriptor_response.file_descriptor_proto)
    return {p.name: p for p in protos}


def comments(proto: descriptor_pb2.FileDescriptorProto) -> str:
    return "\n".join(loc.leading_comments for loc in proto.source_code_info.location)


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
async def test_lists_services_and_serves_the_comments(channel: grpc.aio.Channel, version: str) -> None:
    listed, by_symbol, by_name, missing = await ask(
        channel, version,
        rpb.ServerReflectionRequest(list_services=""),
        rpb.ServerReflectionRequest(file_containing_symbol="lingua.scheduler.v1.Scheduler"),
        rpb.ServerReflectionRequest(file_by_filename="lingua/scheduler/v1/scheduler.proto"),
        rpb.ServerReflectionRequest(file_containing_symbol="lingua.scheduler.v1.NoSuchThing"),
    )
    assert {s.name for s in listed.list_services_response.service} == SERVICES
    for reply in (by_symbol, by_name):
        files = files_of(reply)
        # the file and its imports, so a client can build every type without proto files
        assert set(files) == {"lingua/scheduler/v1/scheduler.proto", "google/protobuf/timestamp.proto",
                              "google/protobuf/duration.proto"}
        assert SUBMIT_COMMENT in comments(files["lingua/scheduler/v1/scheduler.proto"])
    assert missing.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


@pytest.mark.parametrize("service", sorted(SERVICES))
async def test_every_listed_service_is_described(channel: grpc.aio.Channel, service: str) -> None:
    (reply,) = await ask(channel, "v1", rpb.ServerReflectionRequest(file_containing_symbol=service))
    pool = descriptor_pool.DescriptorPool()
    files = files_of(reply)
    for name in sorted(files, key=lambda n: n.startswith("lingua/")):  # imports first
        pool.Add(files[name])
    assert pool.FindServiceByName(service).methods


async def test_the_library_client_builds_the_contract(app: App) -> None:
    """grpcio-reflection's own client (v1alpha, sync) rebuilds the service from reflection alone."""

    def describe() -> tuple[list[str], list[str]]:
        with grpc.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            db = ProtoReflectionDescriptorDatabase(channel)
            pool = descriptor_pool.DescriptorPool(db)
            service = pool.FindServiceByName("lingua.scheduler.v1.Scheduler")
            return list(db.get_services()), [m.name for m in service.methods]

    services, methods = await asyncio.to_thread(describe)  # sync client: off the loop the server runs on
    assert set(services) == SERVICES
    assert {"Submit", "GetJob", "WatchJob", "NodeSession"} <= set(methods)


async def test_extension_queries(channel: grpc.aio.Channel) -> None:
    """The contract declares no extensions: the numbers of a type are none; an unknown type is NOT_FOUND."""
    numbers, unknown, no_extension = await ask(
        channel, "v1",
        rpb.ServerReflectionRequest(all_extension_numbers_of_type="lingua.scheduler.v1.Job"),
        rpb.ServerReflectionRequest(all_extension_numbers_of_type="lingua.scheduler.v1.Nope"),
        rpb.ServerReflectionRequest(file_containing_extension=rpb.ExtensionRequest(
            containing_type="lingua.scheduler.v1.Job", extension_number=100)),
    )
    assert numbers.all_extension_numbers_response.base_type_name == "lingua.scheduler.v1.Job"
    assert list(numbers.all_extension_numbers_response.extension_number) == []
    assert unknown.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]
    assert no_extension.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]
