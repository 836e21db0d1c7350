"""EVM keys for both planes: eth-account imported on first use, without its side effect.

py_ecc (under eth-account) raises the interpreter's recursion limit to 100000 when it is
imported. The gateway's JSON depth guard relies on the default: a body nested deeper than the
stack allows must raise RecursionError, not overflow the C stack. So no gateway process imports
eth-account at start-up, and every import of it (or of the x402 and pympp SDKs, which import
it) goes through `import_keeping_recursion_limit`, which puts the limit back.
"""

from __future__ import annotations

import importlib
import re
import sys
from types import ModuleType

PRIVATE_KEY_RE = re.compile(r"^0x[0-9a-fA-F]{64}$")


def import_keeping_recursion_limit(module: str) -> ModuleType:
    """`importlib.import_module(module)` (e.g. "eth_account", "eth_account.messages",
    "mpp.methods.evm.client") with the recursion limit as it was before. Idempotent: a module
    already imported is returned from `sys.modules`."""
    limit = sys.getrecursionlimit()
    try:
        return importlib.import_module(module)
    finally:
        sys.setrecursionlimit(limit)


def generate_private_key() -> str:
    """A fresh secp256k1 private key from the OS's CSPRNG: 0x + 64 lower-case hex digits."""
    account = import_keeping_recursion_limit("eth_account").Account.create()
    return "0x" + bytes(account.key).hex()


def address_of(private_key: str) -> str:
    """The checksummed 0x address of a private key (0x + 64 hex digits). ValueError when it is
    not one, or is not a valid secp256k1 scalar (zero, or not below the curve order); the message
    never quotes the key."""
    if not PRIVATE_KEY_RE.match(private_key):
        raise ValueError("a private key is 0x and 64 hex digits")
    try:
        address = import_keeping_recursion_limit("eth_account").Account.from_key(private_key).address
    except ValueError:
        raise ValueError("not a valid secp256k1 private key (zero, or not below the curve order)") from None
    return str(address)
