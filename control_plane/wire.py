"""The hand-written protobuf encoding of what the control plane sends.

Resources are serialized once per snapshot into `google.protobuf.Any` bytes; responses
are then assembled from those bytes with a few length-delimited fields, without building
response messages (protobuf fields may come in any order, so a nonce can be appended).
"""

from __future__ import annotations


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_field(number: int, payload: bytes) -> bytes:
    """Protobuf length-delimited field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def encode_any(type_url: str, value: bytes) -> bytes:
    """The wire bytes of a google.protobuf.Any."""
    return encode_field(1, type_url.encode()) + encode_field(2, value)


def encode_sotw_body(version: str, resources: list[bytes], type_url: str) -> bytes:
    """A DiscoveryResponse from Any resources, all but its nonce (see `with_nonce`)."""
    parts = [encode_field(1, version.encode())]
    parts += [encode_field(2, blob) for blob in resources]
    parts.append(encode_field(4, type_url.encode()))
    return b"".join(parts)


def with_nonce(body: bytes, nonce: str) -> bytes:
    """A complete response: a body shared by streams plus this stream's nonce (field 5 in
    both DiscoveryResponse and DeltaDiscoveryResponse; field order does not matter)."""
    return body + encode_field(5, nonce.encode())


def encode_delta_body(
    version: str,
    resources: dict[str, tuple[str, bytes]],
    removed: list[str],
    type_url: str,
) -> bytes:
    """A DeltaDiscoveryResponse, all but its nonce (see `with_nonce`); `resources` maps
    name -> (version, Any)."""
    parts = [encode_field(1, version.encode())]
    for name, (res_version, blob) in resources.items():
        resource = (
            encode_field(1, res_version.encode())
            + encode_field(2, blob)
            + encode_field(3, name.encode())
        )
        parts.append(encode_field(2, resource))
    parts.append(encode_field(4, type_url.encode()))
    parts += [encode_field(6, name.encode()) for name in removed]
    return b"".join(parts)


def encode_delta_response(
    version: str,
    resources: dict[str, tuple[str, bytes]],
    removed: list[str],
    type_url: str,
    nonce: str,
) -> bytes:
    """The wire bytes of a whole DeltaDiscoveryResponse."""
    return with_nonce(encode_delta_body(version, resources, removed, type_url), nonce)
