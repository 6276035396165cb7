"""A small agsync client for Python: generates the gRPC stubs from the
project's proto on first use, and converts between JSON-like dicts and
google.protobuf.Struct. Import it and use `connect()`.
"""
import os
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
PROTO_ROOT = HERE.parent.parent / "proto"
GEN = HERE / "gen"


def _generate_stubs():
    """Compiles proto/agsync/v1/sync.proto with grpcio-tools into ./gen."""
    from grpc_tools import protoc
    import grpc_tools

    GEN.mkdir(exist_ok=True)
    well_known = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={GEN}",
        f"--grpc_python_out={GEN}",
        str(PROTO_ROOT / "agsync" / "v1" / "sync.proto"),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed to compile sync.proto")


if not (GEN / "agsync" / "v1" / "sync_pb2.py").exists() or os.environ.get("AGSYNC_REGENERATE"):
    _generate_stubs()
sys.path.insert(0, str(GEN))

import grpc  # noqa: E402
from google.protobuf import json_format, struct_pb2  # noqa: E402
from agsync.v1 import sync_pb2, sync_pb2_grpc  # noqa: E402,F401

ADDRESS = os.environ.get("AGSYNC_ADDR", "127.0.0.1:50051")


def connect(address=ADDRESS):
    """A SyncService stub on an insecure channel (agsync on loopback)."""
    channel = grpc.insecure_channel(address)
    grpc.channel_ready_future(channel).result(timeout=10)
    return sync_pb2_grpc.SyncServiceStub(channel)


def struct(obj):
    """A dict as a google.protobuf.Struct."""
    s = struct_pb2.Struct()
    s.update(obj)
    return s


def to_dict(s):
    """A google.protobuf.Struct as a dict (integral numbers as ints)."""
    def clean(v):
        if isinstance(v, float) and v.is_integer():
            return int(v)
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list):
            return [clean(x) for x in v]
        return v
    return clean(json_format.MessageToDict(s))
