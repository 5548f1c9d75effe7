"""Message classes of the Open Inference Protocol (grpc_api/proto/open_inference.proto), built at run time.

The classes live in a descriptor pool of their own, not protobuf's default one: a process that
also imports a KServe v2 client (tritonclient registers `inference.ModelInferRequest` in the
default pool) would otherwise fail with "duplicate symbol". Built with grpcio-tools' protoc (a
server requirement already, for the client's stubs), so nothing is generated into the tree.
"""

from __future__ import annotations

import functools
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

PROTO = Path(__file__).resolve().parent / "proto" / "open_inference.proto"
PACKAGE = "inference"
SERVICE = f"{PACKAGE}.GRPCInferenceService"  # what KServe v2 clients call
# The same service inside TorchServe 0.12 (served with ts_open_inference_protocol=true).
TORCHSERVE_SERVICE = "org.pytorch.serve.grpc.openinference.GRPCInferenceService"
# (method, request message, response message); every method is unary.
METHODS = (
    ("ServerLive", "ServerLiveRequest", "ServerLiveResponse"),
    ("ServerReady", "ServerReadyRequest", "ServerReadyResponse"),
    ("ModelReady", "ModelReadyRequest", "ModelReadyResponse"),
    ("ServerMetadata", "ServerMetadataRequest", "ServerMetadataResponse"),
    ("ModelMetadata", "ModelMetadataRequest", "ModelMetadataResponse"),
    ("ModelInfer", "ModelInferRequest", "ModelInferResponse"),
)


class OipProtoError(RuntimeError):
    """The proto file could not be compiled (grpcio-tools missing or the file broken)."""


@dataclass(frozen=True)
class OipMessages:
    """Message classes by short name (`messages["ModelInferRequest"]`)."""

    classes: dict[str, Any]

    def __getitem__(self, name: str) -> Any:
        return self.classes[name]


def descriptor_set(proto: Path = PROTO) -> descriptor_pb2.FileDescriptorSet:
    """The compiled proto file (its own directory is the include path; it imports nothing)."""
    try:
        from grpc_tools import protoc
    except ImportError as error:
        raise OipProtoError("grpcio-tools is needed to build the OIP messages: pip install grpcio-tools") from error
    with tempfile.TemporaryDirectory(prefix="oip-proto-") as tmp:
        out = Path(tmp) / "oip.pb"
        args = ["protoc", f"--proto_path={proto.parent}", f"--descriptor_set_out={out}", str(proto)]
        if protoc.main(args) != 0:
            raise OipProtoError(f"protoc failed on {proto}")
        return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


@functools.lru_cache(maxsize=1)
def load() -> OipMessages:
    pool = descriptor_pool.DescriptorPool()
    files = descriptor_set().file
    for file in files:
        pool.Add(file)
    classes = message_factory.GetMessageClassesForFiles([f.name for f in files], pool)
    prefix = f"{PACKAGE}."
    return OipMessages({name[len(prefix):]: cls for name, cls in classes.items() if name.startswith(prefix)})
