"""The committed gRPC stubs are exactly what grpcio-tools generates from the public proto."""

from __future__ import annotations

from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[3]
PROTO = "protos/onetower/v1/onetower.proto"
STUBS = ("onetower_pb2.py", "onetower_pb2.pyi", "onetower_pb2_grpc.py")


def test_committed_stubs_are_fresh(tmp_path: Path) -> None:
    rc = protoc.main(["grpc_tools.protoc", f"-I{ROOT}", f"--python_out={tmp_path}", f"--pyi_out={tmp_path}",
                      f"--grpc_python_out={tmp_path}", str(ROOT / PROTO)])
    assert rc == 0
    for name in STUBS:
        generated = (tmp_path / "protos/onetower/v1" / name).read_text()
        committed = (ROOT / "protos/onetower/v1" / name).read_text()
        assert generated == committed, f"{name} is stale: run `make protos` and commit the result"


def test_contract_declares_all_eight_rpcs() -> None:
    from protos.onetower.v1 import onetower_pb2 as pb

    service = pb.DESCRIPTOR.services_by_name["Recommendations"]
    assert service.full_name == "onetower.v1.Recommendations"
    assert {m.name for m in service.methods} == {
        "EmbedItems", "UpsertItems", "DeleteItems", "SimilarItems", "RecommendForUser", "GetEmbeddings", "GetInfo",
        "GetLiveItems"}
