"""Reflection-only client: with no .proto files, list each server's services
through reflection (v1 and v1alpha), describe them, check health, and call an
RPC built purely from the reflected descriptors. Mirrors the README's grpcurl
session. Usage: reflection_check.py AUTH_ADDR JOBS_ADDR MEMORY_ADDR WORKER_ADDR
"""

import sys
import uuid

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

EXPECTED = {
    0: ["keel.auth.v1.AuthService"],
    1: ["keel.jobs.v1.JobsService", "keel.jobs.v1.JobRunnerService"],
    2: ["keel.memory.v1.MemoryService"],
    3: [],
}
ALWAYS = ["grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection"]
checks = 0


def check(cond, what):
    global checks
    if not cond:
        raise SystemExit(f"reflection check FAILED: {what}")
    checks += 1


def list_services(channel, version):
    """`grpcurl list`, speaking reflection `version` (v1 and v1alpha share a wire format)."""
    call = channel.stream_stream(
        f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    responses = call(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
    return [s.name for r in responses for s in r.list_services_response.service]


def main(addrs):
    for i, addr in enumerate(addrs):
        channel = grpc.insecure_channel(addr)
        for version in ("v1", "v1alpha"):
            listed = list_services(channel, version)
            for name in EXPECTED[i] + ALWAYS:
                check(name in listed, f"{addr} {version} lists {name}: {listed}")
        health = health_pb2_grpc.HealthStub(channel)
        for name in [""] + EXPECTED[i]:
            status = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status
            check(status == health_pb2.HealthCheckResponse.SERVING, f"{addr} health {name!r}")

        # `grpcurl describe`: every method's request and response types resolve.
        db = ProtoReflectionDescriptorDatabase(channel)
        pool = descriptor_pool.DescriptorPool(db)
        for name in EXPECTED[i]:
            service = pool.FindServiceByName(name)
            check(len(service.methods) > 0, f"{name} has methods")
            for m in service.methods:
                check(m.input_type.full_name.endswith("Request"), f"{m.full_name} input")
                check(m.output_type.full_name.endswith("Response"), f"{m.full_name} output")

    # An RPC built from reflected descriptors only: Register on auth.
    channel = grpc.insecure_channel(addrs[0])
    pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
    method = pool.FindServiceByName("keel.auth.v1.AuthService").methods_by_name["Register"]
    request_cls = message_factory.GetMessageClass(method.input_type)
    response_cls = message_factory.GetMessageClass(method.output_type)
    request = json_format.ParseDict(
        {
            "email": f"reflect-{uuid.uuid4().hex[:8]}@Example.com ",
            "password": "correct horse battery",
            "displayName": "Reflection",
        },
        request_cls(),
    )
    register = channel.unary_unary(
        "/keel.auth.v1.AuthService/Register",
        request_serializer=request_cls.SerializeToString,
        response_deserializer=response_cls.FromString,
    )
    answer = json_format.MessageToDict(register(request, timeout=30))
    check(answer["user"]["email"].endswith("@example.com"), f"register answer {answer}")
    check(answer["tokens"]["accessToken"].count(".") == 2, "access token is a JWT")
    print(f"reflection check: {checks} passed, 0 failed")


if __name__ == "__main__":
    main(sys.argv[1:5])
