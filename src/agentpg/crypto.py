"""Sealed secrets: AES-256-GCM with a key ring, bound to the row and field they belong to.

A sealed value looks like ``v1.<key id>.<base64url(nonce || ciphertext+tag)>``. The associated data is
``<table>/<row id>/<field>``, so a ciphertext copied into another row or column does not open. The key
id lets a ring hold several keys while ``keys rotate`` re-seals values under the newest one.

A ring read from a key file stays bound to it (:class:`KeyFile`), so several processes can share one file
while ``agentpg keys rotate`` changes it: before sealing, a ring checks (one ``stat``) whether the file
changed and re-reads it, so every process seals under the key the file calls active; and when ``open``
meets a key id it does not know, it re-reads the file once. Keys are only ever added to a ring in memory;
a key retired from the file stays usable in a running process until it restarts.

A ring from ``AGENTPG_SECRET_KEY`` is fixed for the life of the process: the variable may hold several
comma-separated keys, the first of which seals (see :func:`keyring_from_secret`).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import logging
import os
import secrets
import threading
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from agentpg.errors import SecretError

log = logging.getLogger(__name__)

_VERSION = "v1"
_NONCE_BYTES = 12
_KEY_BYTES = 32

FileSignature = tuple[int, int, int]
"""(inode, mtime in ns, size) of the key file: changes whenever the file is replaced."""


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


def key_id_of(sealed: str) -> str:
    """The id of the master key a sealed value needs ('' when the value is malformed)."""
    parts = sealed.split(".", 2)
    return parts[1] if len(parts) == 3 else ""


@dataclass
class KeyRing:
    """Master keys by id; ``active`` seals, any known key opens.

    ``file`` is set on rings read from a key file (:meth:`KeyFile.read`); such a ring follows the file as
    described in the module docstring. Rings built directly, or from ``AGENTPG_SECRET_KEY``, are fixed.
    """

    active: str
    keys: dict[str, bytes] = field(repr=False)
    file: KeyFile | None = field(default=None, repr=False, compare=False)
    _seen: FileSignature | None = field(default=None, init=False, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.active not in self.keys:
            raise SecretError("the active master key is not in the key ring")
        for kid, key in self.keys.items():
            if len(key) != _KEY_BYTES:
                raise SecretError(f"master key {kid!r} must be {_KEY_BYTES} bytes")

    def seal(self, plaintext: str, context: SealContext) -> str:
        self.refresh()
        active = self.active  # keys only grow, so this id stays in self.keys even if a refresh runs now
        nonce = os.urandom(_NONCE_BYTES)
        ciphertext = AESGCM(self.keys[active]).encrypt(nonce, plaintext.encode(), context.aad())
        return f"{_VERSION}.{active}.{_b64(nonce + ciphertext)}"

    def open(self, sealed: str, context: SealContext) -> str:
        try:
            version, kid, body = sealed.split(".", 2)
        except ValueError:
            raise SecretError("sealed value is malformed") from None
        if version != _VERSION:
            raise SecretError(f"sealed value has unknown format {version!r}")
        key = self.keys.get(kid)
        if key is None and self.file is not None:
            # Sealed by a process that read a newer ring (``keys rotate``): read the file once more.
            self.refresh(force=True)
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
        return key_id_of(sealed)

    def refresh(self, *, force: bool = False) -> bool:
        """Re-read the bound key file if it changed since it was last read (or always, with ``force``).

        Keys found in the file are added, and the file's active key becomes this ring's; keys the file no
        longer has are kept. Returns whether the ring changed. A missing file changes nothing (the ring in
        memory keeps working); a file that exists but does not parse raises :class:`SecretError`.
        """
        if self.file is None:
            return False
        with self._lock:
            signature = self.file.signature()
            if signature is None or (signature == self._seen and not force):
                return False
            disk = self.file.parse()
            self._seen = signature
            merged = {**self.keys, **disk.keys}
            changed = merged.keys() != self.keys.keys() or disk.active != self.active
            self.keys = merged  # first the keys, then the active id, so a concurrent seal always finds its key
            self.active = disk.active
        if changed:
            log.info("key ring reloaded from %s: active key %s, %d key(s)", self.file.path, self.active,
                     len(self.keys))
        return changed

    def with_new_key(self) -> KeyRing:
        """A copy with one fresh key added and made active (unbound: write it with :meth:`KeyFile.write`)."""
        kid = new_key_id()
        while kid in self.keys:
            kid = new_key_id()
        return KeyRing(active=kid, keys={**self.keys, kid: AESGCM.generate_key(bit_length=256)})

    def only(self, kids: set[str]) -> KeyRing:
        """A copy (unbound) holding only ``kids``, which must include the active key."""
        return KeyRing(active=self.active, keys={k: v for k, v in self.keys.items() if k in kids})

    def detached(self) -> KeyRing:
        """An unbound copy that no longer follows the key file."""
        return KeyRing(active=self.active, keys=dict(self.keys))

    def to_json(self) -> str:
        return json.dumps({"active": self.active, "keys": {k: _b64(v) for k, v in self.keys.items()}})

    @classmethod
    def from_json(cls, text: str) -> KeyRing:
        try:
            data = json.loads(text)
            return cls(active=data["active"], keys={k: _unb64(v) for k, v in data["keys"].items()})
        except (KeyError, TypeError, ValueError, AttributeError, binascii.Error):
            raise SecretError("the key file is not a valid agentpg key ring") from None


@dataclass(frozen=True)
class KeyFile:
    """The key ring's file: JSON, mode 0600, only ever replaced atomically."""

    path: Path

    def signature(self) -> FileSignature | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def parse(self) -> KeyRing:
        """The ring in the file, not bound to it."""
        try:
            text = self.path.read_text()
        except OSError as exc:
            raise SecretError(f"the key file {self.path} cannot be read ({exc.strerror})") from None
        return KeyRing.from_json(text)

    def read(self) -> KeyRing:
        """The ring in the file, bound to it so it follows later changes."""
        signature = self.signature()  # before reading: if the file changes meanwhile, the next seal re-reads
        disk = self.parse()
        ring = KeyRing(active=disk.active, keys=disk.keys, file=self)
        ring._seen = signature
        return ring

    def write(self, ring: KeyRing) -> None:
        """Replace the file with ``ring``, durably: see :func:`write_keyring`."""
        write_keyring(self.path, ring, replace=True)


def new_key_id() -> str:
    return secrets.token_hex(4)


def _key_from_base64(text: str) -> bytes:
    try:
        key = base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_")
    except (binascii.Error, ValueError):
        raise SecretError("AGENTPG_SECRET_KEY must be base64 of 32 random bytes") from None
    if len(key) != _KEY_BYTES:
        raise SecretError("AGENTPG_SECRET_KEY must decode to exactly 32 bytes")
    return key


def env_key_id(key: bytes) -> str:
    """The id of a key given in ``AGENTPG_SECRET_KEY``: derived from the key, so it is the same everywhere."""
    return "env" + hashlib.sha256(key).hexdigest()[:6]


def keyring_from_secret(secret: str) -> KeyRing:
    """A ring from ``AGENTPG_SECRET_KEY``: base64 of 32 bytes, or several such keys separated by commas.

    The first key is active (it seals), all of them open. Each key's id derives from the key itself, so
    processes agree on ids whatever order they list the keys in.
    """
    keys: dict[str, bytes] = {}
    active = None
    for part in secret.split(","):
        text = part.strip()
        if not text:
            continue
        key = _key_from_base64(text)
        kid = env_key_id(key)
        keys.setdefault(kid, key)
        active = active or kid
    if active is None:
        raise SecretError("AGENTPG_SECRET_KEY must be base64 of 32 random bytes")
    return KeyRing(active=active, keys=keys)


def load_or_create_keyring(path: Path) -> KeyRing:
    """Read the key file, or create it (mode 0600, atomically) with one fresh key on first start.

    The ring returned is bound to the file (:attr:`KeyRing.file`).
    """
    key_file = KeyFile(path)
    if path.exists():
        return key_file.read()
    path.parent.mkdir(parents=True, exist_ok=True)
    kid = new_key_id()
    ring = KeyRing(active=kid, keys={kid: AESGCM.generate_key(bit_length=256)})
    write_keyring(path, ring)
    # Another process may have raced us; whoever linked first wins and everybody reads that one.
    return key_file.read()


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_keyring(path: Path, ring: KeyRing, *, replace: bool = False) -> None:
    """Write atomically with 0600 from the first byte; without ``replace`` an existing file is kept.

    The new file's content and its directory entry are fsynced before this returns, so a ring that was
    written survives a crash or power loss right afterwards.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(ring.to_json())
            handle.flush()
            os.fsync(handle.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            with contextlib.suppress(FileExistsError):  # someone else's first key won: keep it
                os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
