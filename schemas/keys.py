"""Virtual-key format, keyed hashing, and provider-key encryption.

Both derive from one master secret (`ALEPHANT_SECRET_KEY`): the control plane hashes and
encrypts, the data plane looks up and decrypts. Plaintext virtual keys exist only in the
response that creates them; plaintext provider keys exist only in worker memory.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

from cryptography.fernet import Fernet, InvalidToken

from schemas.settings import Secret

KEY_PREFIX = "sk-alph-"


class KeyMaterialError(ValueError):
    """The master secret is missing, or a ciphertext was not made with it."""


class KeyRing:
    """Keyed hashing for virtual keys and symmetric encryption for provider keys."""

    __slots__ = ("_fernet", "_hash_key")

    def __init__(self, master: Secret) -> None:
        raw = master.reveal().encode()
        if len(raw) < 16:
            raise KeyMaterialError("ALEPHANT_SECRET_KEY must be set to at least 16 characters")
        self._hash_key = hmac.new(raw, b"alephant/virtual-key-hash", hashlib.sha256).digest()
        enc_key = hmac.new(raw, b"alephant/provider-key-encryption", hashlib.sha256).digest()
        self._fernet = Fernet(base64.urlsafe_b64encode(enc_key))

    def __repr__(self) -> str:
        return "KeyRing(***)"

    def hash_key(self, plaintext: str) -> str:
        """HMAC-SHA256 of a virtual key, hex. Stable for a given master secret."""
        return hmac.new(self._hash_key, plaintext.encode(), hashlib.sha256).hexdigest()

    def encrypt(self, plaintext: str) -> str:
        return self._fernet.encrypt(plaintext.encode()).decode()

    def decrypt(self, ciphertext: str) -> Secret:
        try:
            return Secret(self._fernet.decrypt(ciphertext.encode()).decode())
        except InvalidToken:
            raise KeyMaterialError("a provider key was encrypted with a different ALEPHANT_SECRET_KEY") from None


def generate_virtual_key() -> str:
    """A new virtual key: `sk-alph-` followed by 43 url-safe random characters (256 bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def display_prefix(plaintext: str) -> str:
    """The part of a key safe to show in listings, e.g. `sk-alph-AbCd`."""
    return plaintext[: len(KEY_PREFIX) + 4]
