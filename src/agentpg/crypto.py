"""Sealed secrets: AES-256-GCM with a key ring, bound to the row and field they belong to.

A sealed value looks like ``v1.<key id>.<base64url(nonce || ciphertext+tag)>``. The associated data is
``<table>/<row id>/<field>``, so a ciphertext copied into another row or column does not open. The key
id lets a ring hold several keys while ``keys rotate`` re-seals values under the newest one.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from agentpg.errors import SecretError

_VERSION = "v1"
_NONCE_BYTES = 12
_KEY_BYTES = 32


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class SealContext:
    """Where a sealed value lives; becomes the AES-GCM associated data."""

    table: str
    row_id: str
    field: str

    def aad(self) -> bytes:
        return f"{self.table}/{self.row_id}/{self.field}".encode()


@dataclass
class KeyRing:
    """Master keys by id; ``active`` seals, any known key opens."""

    active: str
    keys: dict[str, bytes] = field(repr=False)

    def __post_init__(self) -> None:
        if self.active not in self.keys:
            raise SecretError("the active master key is not in the key ring")
        for kid, key in self.keys.items():
            if len(key) != _KEY_BYTES:
                raise SecretError(f"master key {kid!r} must be {_KEY_BYTES} bytes")

    def seal(self, plaintext: str, context: SealContext) -> str:
        nonce = os.urandom(_NONCE_BYTES)
        ciphertext = AESGCM(self.keys[self.active]).encrypt(nonce, plaintext.encode(), context.aad())
        return f"{_VERSION}.{self.active}.{_b64(nonce + ciphertext)}"

    def open(self, sealed: str, context: SealContext) -> str:
        try:
            version, kid, body = sealed.split(".", 2)
        except ValueError:
            raise SecretError("sealed value is malformed") from None
        if version != _VERSION:
            raise SecretError(f"sealed value has unknown format {version!r}")
        key = self.keys.get(kid)
        if key is None:
            raise SecretError(f"sealed value needs master key {kid!r}, which is not in the key ring")
        try:
            raw = _unb64(body)
            return AESGCM(key).decrypt(raw[:_NONCE_BYTES], raw[_NONCE_BYTES:], context.aad()).decode()
        except (InvalidTag, ValueError, binascii.Error):
            raise SecretError(
                f"sealed {context.field} of {context.table} {context.row_id!r} does not open "
                "(wrong key, tampered, or moved from another row)"
            ) from None

    def key_id_of(self, sealed: str) -> str:
        return sealed.split(".", 2)[1]

    def to_json(self) -> str:
        return json.dumps({"active": self.active, "keys": {k: _b64(v) for k, v in self.keys.items()}})

    @classmethod
    def from_json(cls, text: str) -> KeyRing:
        try:
            data = json.loads(text)
            return cls(active=data["active"], keys={k: _unb64(v) for k, v in data["keys"].items()})
        except (KeyError, TypeError, ValueError, binascii.Error):
            raise SecretError("the key file is not a valid agentpg key ring") from None


def new_key_id() -> str:
    return secrets.token_hex(4)


def keyring_from_secret(secret: str) -> KeyRing:
    """A one-key ring from ``AGENTPG_SECRET_KEY`` (base64 of 32 bytes); its id derives from the key."""
    try:
        key = base64.b64decode(secret.strip() + "=" * (-len(secret.strip()) % 4), altchars=b"-_")
    except (binascii.Error, ValueError):
        raise SecretError("AGENTPG_SECRET_KEY must be base64 of 32 random bytes") from None
    if len(key) != _KEY_BYTES:
        raise SecretError("AGENTPG_SECRET_KEY must decode to exactly 32 bytes")

    kid = "env" + hashlib.sha256(key).hexdigest()[:6]
    return KeyRing(active=kid, keys={kid: key})


def load_or_create_keyring(path: Path) -> KeyRing:
    """Read the key file, or create it (mode 0600, atomically) with one fresh key on first start."""
    if path.exists():
        return KeyRing.from_json(path.read_text())
    path.parent.mkdir(parents=True, exist_ok=True)
    kid = new_key_id()
    ring = KeyRing(active=kid, keys={kid: AESGCM.generate_key(bit_length=256)})
    write_keyring(path, ring)
    # Another process may have raced us; whoever linked first wins and everybody reads that one.
    return KeyRing.from_json(path.read_text())


def write_keyring(path: Path, ring: KeyRing, *, replace: bool = False) -> None:
    """Write atomically with 0600 from the first byte; without ``replace`` an existing file is kept."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(ring.to_json())
        handle.flush()
        os.fsync(handle.fileno())
    if replace:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
