"""Token auth on every RPC, and TLS (untrusted CA and wrong hostname refused), through real servers on free ports."""

from __future__ import annotations

import datetime
import ipaddress
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from protos.onetower.v1 import onetower_pb2 as pb
from protos.onetower.v1 import onetower_pb2_grpc as pb_grpc
from service.client import Client
from service.server import RunningServer, start_server

from .conftest import Served, make_config

TOKEN = "s3cret"


def _self_signed(folder: Path, name: str = "localhost") -> tuple[Path, Path]:
    """A self-signed certificate for `name` and 127.0.0.1 (its own CA) and its key, as PEM files in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def _start(served: Served, folder: Path, **overrides: object) -> RunningServer:
    """A server over its own copy of the index, so the writes tried here never reach the package's server."""
    shutil.copytree(served.root / "index", folder / "index")
    return start_server(make_config(served, index_root=folder / "index", cache_dir=folder / "cache", **overrides))


@pytest.fixture(scope="module")
def token_server(served: Served, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    running = _start(served, tmp_path_factory.mktemp("token"), auth_token=TOKEN)
    yield running
    running.stop(grace=0)


@pytest.fixture(scope="module")
def tls_cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return _self_signed(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def tls_token_server(served: Served, tls_cert: tuple[Path, Path],
                     tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    cert, key = tls_cert
    running = _start(served, tmp_path_factory.mktemp("tls-token"), tls_cert=cert, tls_key=key, auth_token=TOKEN)
    yield running
    running.stop(grace=0)


# every RPC of the public service, with a request that succeeds given the token
RPCS: list[tuple[str, Callable[[], Any]]] = [
    ("EmbedItems", lambda: pb.EmbedItemsRequest(items=[pb.Item(title="red leather bag")])),
    ("UpsertItems", lambda: pb.UpsertItemsRequest(items=[pb.Item(item_id="sec-new", title="blue cotton shirt")])),
    ("DeleteItems", lambda: pb.DeleteItemsRequest(item_ids=["item-005"])),
    ("SimilarItems", lambda: pb.SimilarItemsRequest(queries=[pb.Query(item_id="item-001")], k=3)),
    ("RecommendForUser", lambda: pb.RecommendForUserRequest(history=[pb.HistoryEvent(item_id="item-001")], k=3)),
    ("GetEmbeddings", lambda: pb.GetEmbeddingsRequest(item_ids=["item-002"])),
    ("GetInfo", lambda: pb.GetInfoRequest()),
    ("GetLiveItems", lambda: pb.GetLiveItemsRequest(item_ids=["sec-new"])),
]
RPCS_BY_NAME = dict(RPCS)
BAD_METADATA = {"missing": None, "wrong": [("authorization", "Bearer nope")],
                "without the Bearer scheme": [("authorization", TOKEN)]}


def _refused(stub: pb_grpc.RecommendationsStub, rpc: str, metadata: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        getattr(stub, rpc)(RPCS_BY_NAME[rpc](), metadata=metadata, timeout=20)
    return err.value.code(), err.value.details()


@pytest.mark.parametrize("rpc", list(RPCS_BY_NAME))
def test_every_rpc_refuses_a_missing_or_wrong_token(token_server: RunningServer, rpc: str) -> None:
    with Client(f"127.0.0.1:{token_server.port}") as anonymous:
        assert anonymous.health_status() == "SERVING"  # probes need no token
        for case, metadata in BAD_METADATA.items():
            code, details = _refused(anonymous.stub, rpc, metadata)
            assert (code, details.startswith("unauthenticated:")) == (grpc.StatusCode.UNAUTHENTICATED, True), case


def test_refused_writes_change_nothing_and_the_token_lets_every_rpc_through(token_server: RunningServer) -> None:
    target = f"127.0.0.1:{token_server.port}"
    with Client(target) as anonymous, Client(target, token=TOKEN) as good:
        before = good.info().item_count
        for metadata in BAD_METADATA.values():
            _refused(anonymous.stub, "UpsertItems", metadata)
            _refused(anonymous.stub, "DeleteItems", metadata)
        assert good.info().item_count == before
        assert "item-005" in good.embeddings(["item-005"])  # the refused delete left it
        with pytest.raises(grpc.RpcError) as err:
            good.embeddings(["sec-new"])  # the refused upsert stored nothing
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        for rpc, request in RPCS:
            getattr(good.stub, rpc)(request(), metadata=good.metadata, timeout=20)
        assert good.info().item_count == before  # one upsert, one delete


def _tls_stub(port: int, root: Path, name: str | None = None) -> tuple[grpc.Channel, pb_grpc.RecommendationsStub]:
    """A TLS channel to 127.0.0.1 trusting `root`; `name` is the host name the certificate is checked against."""
    options = [("grpc.ssl_target_name_override", name)] if name else []
    channel = grpc.secure_channel(f"127.0.0.1:{port}", grpc.ssl_channel_credentials(root.read_bytes()), options)
    return channel, pb_grpc.RecommendationsStub(channel)


def _info(stub: pb_grpc.RecommendationsStub, token: str | None) -> pb.GetInfoResponse:
    metadata = [("authorization", f"Bearer {token}")] if token else None
    response: pb.GetInfoResponse = stub.GetInfo(pb.GetInfoRequest(), metadata=metadata, timeout=20)
    return response


def _code(call: Callable[[], object]) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call()
    code: grpc.StatusCode = err.value.code()
    return code


def test_tls_with_a_token_needs_a_trusted_ca_the_right_hostname_and_the_token(
        tls_token_server: RunningServer, tls_cert: tuple[Path, Path], tmp_path: Path) -> None:
    port, (cert, _) = tls_token_server.port, tls_cert
    channel, stub = _tls_stub(port, cert, "localhost")
    with channel:
        assert _info(stub, TOKEN).item_count > 0
        assert _code(lambda: _info(stub, None)) == grpc.StatusCode.UNAUTHENTICATED  # TLS alone is not enough
        assert _code(lambda: _info(stub, "nope")) == grpc.StatusCode.UNAUTHENTICATED
    other_ca, _ = _self_signed(tmp_path / "other")  # same names, another issuer
    channel, stub = _tls_stub(port, other_ca, "localhost")
    with channel:
        assert _code(lambda: _info(stub, TOKEN)) == grpc.StatusCode.UNAVAILABLE  # handshake refused
    channel, stub = _tls_stub(port, cert, "elsewhere.example")  # trusted, but not the name it was issued to
    with channel:
        assert _code(lambda: _info(stub, TOKEN)) == grpc.StatusCode.UNAVAILABLE
    with Client(f"127.0.0.1:{port}", token=TOKEN) as plain:  # plaintext to a TLS-only port
        assert _code(plain.info) == grpc.StatusCode.UNAVAILABLE
