"""What the bootstrap benchmark's Python programs share: the gRPC stubs,
generated from proto/ with grpcio-tools into a directory of their own
(AGSYNC_STUBS_DIR, default a temp directory keyed by the proto's hash), so
nothing is written into the working tree; a channel with a raised receive
limit; percentiles.
"""
import hashlib
import math
import os
import pathlib
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[2]
PROTO_ROOT = ROOT / "proto"
PROTO = PROTO_ROOT / "agsync" / "v1" / "sync.proto"


def _stubs_dir():
    if os.environ.get("AGSYNC_STUBS_DIR"):
        return pathlib.Path(os.environ["AGSYNC_STUBS_DIR"])
    digest = hashlib.sha256(PROTO.read_bytes()).hexdigest()[:12]
    return pathlib.Path(tempfile.gettempdir()) / f"agsync-bootstrap-stubs-{digest}"


def _generate(gen):
    """Compiles sync.proto into `gen` (a temp dir renamed into place, so
    two processes starting at once never see half a package)."""
    from grpc_tools import protoc
    import grpc_tools

    well_known = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=gen.name + ".", dir=gen.parent))
    args = ["protoc", f"-I{PROTO_ROOT}", f"-I{well_known}",
            f"--python_out={tmp}", f"--grpc_python_out={tmp}", str(PROTO)]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed to compile sync.proto")
    try:
        tmp.rename(gen)
    except OSError:  # another process won the race: use its copy
        pass


GEN = _stubs_dir()
if not (GEN / "agsync" / "v1" / "sync_pb2.py").exists():
    _generate(GEN)
sys.path.insert(0, str(GEN))

import grpc  # noqa: E402
from agsync.v1 import sync_pb2, sync_pb2_grpc  # noqa: E402,F401


def connect(address, max_receive_bytes=4 * 1024 * 1024):
    """A SyncService stub on its own insecure channel. grpcio refuses
    responses over `max_receive_bytes` (its default is 4 MiB, the server's
    default page budget)."""
    channel = grpc.insecure_channel(address, options=[
        ("grpc.max_receive_message_length", max_receive_bytes),
        ("grpc.max_send_message_length", 64 * 1024 * 1024),
        # Own connection per process and per call site: never shared with
        # another stub through grpcio's global subchannel pool.
        ("grpc.use_local_subchannel_pool", 1),
    ])
    grpc.channel_ready_future(channel).result(timeout=10)
    return sync_pb2_grpc.SyncServiceStub(channel)


def percentile(sorted_values, p):
    """The nearest-rank percentile of an ascending list (None if empty)."""
    if not sorted_values:
        return None
    k = math.ceil(p / 100 * len(sorted_values)) - 1
    return sorted_values[max(0, min(len(sorted_values) - 1, k))]
