"""The keys that sign OAuth access tokens: derived from the master key ring, never stored or shown.

Each master key of the ring (:mod:`agentpg.crypto`) yields one HMAC-SHA256 key by HKDF-SHA256 with a label
of this use only, so the signing key is exactly as secret as the master key, every ``serve`` instance
sharing the ring derives the same one, and ``agentpg keys rotate`` rotates it: tokens are signed with the
active master key's derived key (its JWT ``kid`` names the master key's id, which is not a secret), and
verified with whichever key their ``kid`` names, so tokens issued before a rotation stay valid until they
expire. HS256 rather than a public-key algorithm: the only party that ever verifies these tokens is agentpg
itself (clients treat access tokens as opaque), so there is no public key to publish.
"""

from __future__ import annotations

import threading

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from joserfc.jwk import KeySet, OctKey

from agentpg.crypto import KeyRing

ALGORITHM = "HS256"
_INFO = b"agentpg/oauth/access-token-signing/v1"
_KID_PREFIX = "apg-"


def _derive(master: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_INFO).derive(master)


class SigningKeys:
    """The derived keys of a key ring, as a JWK set (keys only ever added, like the ring's)."""

    def __init__(self, keyring: KeyRing) -> None:
        self._keyring = keyring
        self._lock = threading.Lock()
        self._derived: dict[str, OctKey] = {}

    def _key(self, key_id: str) -> OctKey | None:
        with self._lock:
            hit = self._derived.get(key_id)
            if hit is None and key_id in self._keyring.keys:
                hit = OctKey.import_key(_derive(self._keyring.keys[key_id]),
                                        {"kid": _KID_PREFIX + key_id, "alg": ALGORITHM, "use": "sig"})
                self._derived[key_id] = hit
            return hit

    def signing_key(self) -> OctKey:
        """The key of the ring's active master key (the key file is re-read first if it changed)."""
        self._keyring.refresh()
        key = self._key(self._keyring.active)
        assert key is not None  # the active key is always in the ring
        return key

    def verification_keys(self, kid: object) -> KeySet | None:
        """A set holding the key a token's ``kid`` names, or None when no master key matches (the key file
        is re-read once first, in case another process rotated it)."""
        if not isinstance(kid, str) or not kid.startswith(_KID_PREFIX) or len(kid) > 80:
            return None
        key_id = kid.removeprefix(_KID_PREFIX)
        key = self._key(key_id)
        if key is None and self._keyring.refresh(force=True):
            key = self._key(key_id)
        return KeySet([key]) if key is not None else None
