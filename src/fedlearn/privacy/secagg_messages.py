"""The messages of secure aggregation, each convertible to and from plain JSON.

Bytes travel as standard base64 strings and maps keyed by client index as
JSON objects with decimal string keys, so an HTTP layer can carry every
message with ``json``. ``from_json`` raises :class:`PayloadError` for
anything malformed.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedlearn.errors import PayloadError
from fedlearn.privacy.quantize import Ring

JSON = dict[str, Any]


@dataclass(frozen=True)
class KeyAdvert:
    """Stage 0, client → server: a client's two public keys (encryption, masking)."""

    client_id: int
    cipher_key: bytes
    mask_key: bytes

    def to_json(self) -> JSON:
        """This message as JSON-ready data."""
        return {"client_id": self.client_id, "cipher_key": _b64(self.cipher_key),
                "mask_key": _b64(self.mask_key)}

    @classmethod
    def from_json(cls, data: object) -> KeyAdvert:
        """The message from :meth:`to_json` data."""
        d = _object(data, "client_id", "cipher_key", "mask_key")
        return cls(_index(d["client_id"]), _unb64(d["cipher_key"]), _unb64(d["mask_key"]))


@dataclass(frozen=True)
class ShareBundle:
    """Stage 1, client → server: encrypted shares, keyed by recipient."""

    client_id: int
    ciphertexts: dict[int, bytes]

    def to_json(self) -> JSON:
        """This message as JSON-ready data."""
        return {"client_id": self.client_id, "ciphertexts": _bytes_map(self.ciphertexts)}

    @classmethod
    def from_json(cls, data: object) -> ShareBundle:
        """The message from :meth:`to_json` data."""
        d = _object(data, "client_id", "ciphertexts")
        return cls(_index(d["client_id"]), _parse_bytes_map(d["ciphertexts"]))


@dataclass(frozen=True)
class ShareInbox:
    """Stage 1, server → client: the encrypted shares addressed to it, keyed by sender."""

    client_id: int
    ciphertexts: dict[int, bytes]

    def to_json(self) -> JSON:
        """This message as JSON-ready data."""
        return {"client_id": self.client_id, "ciphertexts": _bytes_map(self.ciphertexts)}

    @classmethod
    def from_json(cls, data: object) -> ShareInbox:
        """The message from :meth:`to_json` data."""
        d = _object(data, "client_id", "ciphertexts")
        return cls(_index(d["client_id"]), _parse_bytes_map(d["ciphertexts"]))


@dataclass(frozen=True)
class MaskedInput:
    """Stage 2, client → server: the masked, quantised vector (little-endian uint64 bytes)."""

    client_id: int
    masked: bytes

    @classmethod
    def of(cls, client_id: int, vector: Ring) -> MaskedInput:
        """The message carrying ``vector``."""
        return cls(client_id, np.asarray(vector, dtype="<u8").tobytes())

    def vector(self) -> Ring:
        """The masked vector as uint64."""
        if len(self.masked) % 8:
            raise PayloadError("a masked vector must be a whole number of 8-byte integers.")
        return np.frombuffer(self.masked, dtype="<u8").astype(np.uint64)

    def to_json(self) -> JSON:
        """This message as JSON-ready data."""
        return {"client_id": self.client_id, "masked": _b64(self.masked)}

    @classmethod
    def from_json(cls, data: object) -> MaskedInput:
        """The message from :meth:`to_json` data."""
        d = _object(data, "client_id", "masked")
        return cls(_index(d["client_id"]), _unb64(d["masked"]))


@dataclass(frozen=True)
class UnmaskRequest:
    """Stage 3, server → clients: who uploaded a masked vector (survivors) and who dropped."""

    survivors: tuple[int, ...]
    dropped: tuple[int, ...]

    def to_json(self) -> JSON:
        """This message as JSON-ready data."""
        return {"survivors": list(self.survivors), "dropped": list(self.dropped)}

    @classmethod
    def from_json(cls, data: object) -> UnmaskRequest:
        """The message from :meth:`to_json` data."""
        d = _object(data, "survivors", "dropped")
        return cls(_index_list(d["survivors"]), _index_list(d["dropped"]))


@dataclass(frozen=True)
class UnmaskResponse:
    """Stage 3, client → server: self-mask shares of survivors, mask-key shares of the dropped."""

    client_id: int
    self_mask_shares: dict[int, bytes]
    key_shares: dict[int, bytes]

    def to_json(self) -> JSON:
        """This message as JSON-ready data."""
        return {"client_id": self.client_id,
                "self_mask_shares": _bytes_map(self.self_mask_shares),
                "key_shares": _bytes_map(self.key_shares)}

    @classmethod
    def from_json(cls, data: object) -> UnmaskResponse:
        """The message from :meth:`to_json` data."""
        d = _object(data, "client_id", "self_mask_shares", "key_shares")
        return cls(_index(d["client_id"]), _parse_bytes_map(d["self_mask_shares"]),
                   _parse_bytes_map(d["key_shares"]))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(value: object) -> bytes:
    if not isinstance(value, str):
        raise PayloadError("a binary field must be a base64 string.")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise PayloadError("a binary field is not valid base64.") from exc


def _object(data: object, *keys: str) -> dict[str, object]:
    if not isinstance(data, dict) or set(data) != set(keys):
        raise PayloadError(f"a secure aggregation message needs exactly the fields {list(keys)}.")
    return data


def _index(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise PayloadError(f"a client index must be a non-negative integer, got {value!r}.")
    return value


def _index_list(value: object) -> tuple[int, ...]:
    if not isinstance(value, list):
        raise PayloadError("a list of client indices must be a JSON array.")
    return tuple(_index(v) for v in value)


def _bytes_map(values: dict[int, bytes]) -> dict[str, str]:
    return {str(k): _b64(v) for k, v in sorted(values.items())}


def _parse_bytes_map(value: object) -> dict[int, bytes]:
    if not isinstance(value, dict):
        raise PayloadError("a map of client indices must be a JSON object.")
    out: dict[int, bytes] = {}
    for key, v in value.items():
        if not (isinstance(key, str) and key.isdigit()):
            raise PayloadError(f"a client index key must be decimal digits, got {key!r}.")
        out[int(key)] = _unb64(v)
    return out
