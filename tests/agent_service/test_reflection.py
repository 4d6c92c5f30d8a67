"""Server reflection answers under both names: grpc.reflection.v1 and grpc.reflection.v1alpha."""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2

from tests.conftest import Stack

REFLECTION_SERVICES = ["grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"]


async def ask(stack: Stack, service: str, request: reflection_pb2.ServerReflectionRequest) -> list[Any]:
    call = stack.client.channel.stream_stream(
        f"/{service}/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    return [reply async for reply in call(iter([request]))]


def files(reply: reflection_pb2.ServerReflectionResponse) -> list[descriptor_pb2.FileDescriptorProto]:
    raw_files = reply.file_descriptor_response.file_descriptor_proto
    return [descriptor_pb2.FileDescriptorProto.FromString(raw) for raw in raw_files]


@pytest.mark.parametrize("service", REFLECTION_SERVICES)
async def test_reflection_lists_and_describes_the_services(stack: Stack, service: str) -> None:
    [listing] = await ask(stack, service, reflection_pb2.ServerReflectionRequest(list_services=""))
    names = {entry.name for entry in listing.list_services_response.service}
    assert {"agentrun.v1.AgentService", "grpc.health.v1.Health", *REFLECTION_SERVICES} <= names

    [described] = await ask(
        stack, service, reflection_pb2.ServerReflectionRequest(file_containing_symbol="agentrun.v1.AgentService")
    )
    [contract, *_] = files(described)
    assert contract.name == "agentrun/v1/agent_service.proto"
    assert [method.name for method in contract.service[0].method] == [
        "StartRun",
        "StreamRun",
        "Approve",
        "GetRun",
        "CancelRun",
        "ListRuns",
        "ListAgents",
    ]


async def test_the_v1_reflection_service_describes_itself(stack: Stack) -> None:
    request = reflection_pb2.ServerReflectionRequest(file_containing_symbol="grpc.reflection.v1.ServerReflection")
    [reply] = await ask(stack, REFLECTION_SERVICES[0], request)
    [file] = files(reply)
    assert (file.name, file.package) == ("grpc/reflection/v1/reflection.proto", "grpc.reflection.v1")
    assert file.service[0].method[0].input_type == ".grpc.reflection.v1.ServerReflectionRequest"
