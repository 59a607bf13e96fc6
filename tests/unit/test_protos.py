"""The committed generated code is exactly what the .proto files generate."""

from __future__ import annotations

from gateway.protogen import PROTO_ROOT, generate


def test_generated_code_is_up_to_date(tmp_path):
    generated = generate(tmp_path)
    assert generated, "protoc generated nothing"
    for path in generated:
        committed = PROTO_ROOT / path.relative_to(tmp_path)
        assert committed.is_file(), f"{committed} is not committed; run `make protos`"
        assert committed.read_bytes() == path.read_bytes(), (
            f"{committed} is stale; run `make protos`"
        )
