"""Token auth and TLS, both on, through real servers on free ports."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from service.client import Client
from service.server import start_server

from .conftest import Served, make_config


def _self_signed(folder: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_token_required_when_configured(served: Served) -> None:
    running = start_server(make_config(served, auth_token="s3cret"))
    try:
        target = f"127.0.0.1:{running.port}"
        with Client(target) as anonymous:
            assert anonymous.health_status() == "SERVING"  # probes need no token
            with pytest.raises(grpc.RpcError) as err:
                anonymous.info()
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with Client(target, token="wrong") as wrong, pytest.raises(grpc.RpcError) as err:
            wrong.info()
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with Client(target, token="s3cret") as good:
            assert good.info().item_count > 0
    finally:
        running.stop(grace=0)


def test_tls(served: Served, tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    running = start_server(make_config(served, tls_cert=cert, tls_key=key))
    try:
        with Client(f"localhost:{running.port}", root_cert=cert.read_bytes()) as secure:
            assert secure.info().item_count > 0
        with Client(f"localhost:{running.port}", timeout=2) as plain, pytest.raises(grpc.RpcError) as err:
            plain.info()
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        running.stop(grace=0)
