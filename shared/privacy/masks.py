"""SecAgg+ masks from a cryptographic PRG, installed in place of Flower 1.41's 32-bit one.

Why: Flower 1.41's `pseudo_rand_gen` (flwr/common/secure_aggregation/secaggplus_utils.py) folds the whole
mask seed (the 32-byte private seed, or a 32-byte pairwise key agreed by ECDH) into 32 bits by XOR-ing
its 4-byte words, and expands that with numpy's Mersenne Twister (Flower issue 7522). A curious server
that tries all 2^32 seeds recovers a device's masks and sees its masked vector in clear: under trust model
`secure` that is the device's update plus only its own small noise share. Two seeds whose 4-byte words
XOR to the same value even give identical masks.

`secure_prg` expands the FULL seed instead: ChaCha20 keyed by SHA-256(domain || seed), zero nonce (each
seed is a fresh per-round secret, used for one stream), read as little-endian unsigned words. Values in
[0, num_range) are unbiased: masked words for a power-of-two range, rejection sampling otherwise. It keeps
Flower's signature, so `install()` can put it into every Flower module that imported `pseudo_rand_gen`;
avrec's client mod and server workflow call `install()`, so devices and server always use the same PRG
(masks from two different PRGs would not cancel, and the unmasked sum would be garbage, not a leak).
"""

from __future__ import annotations

import hashlib
import importlib
import sys
from typing import Sequence

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

__all__ = ["DOMAIN", "FLOWER_PRG_MODULES", "PRG_NAME", "flower_prg", "install", "installed", "secure_prg"]

DOMAIN = b"avrec/secagg+/mask-prg/v1"  # separates these keys from any other use of the same seed
PRG_NAME = "chacha20(sha256(seed))"
# The Flower 1.41 modules that define or import `pseudo_rand_gen` (grep of flwr/): all are patched.
FLOWER_PRG_MODULES = (
    "flwr.common.secure_aggregation.secaggplus_utils",
    "flwr.client.mod.secure_aggregation.secaggplus_mod",
    "flwr.server.workflow.secure_aggregation.secaggplus_workflow",
)


class _Stream:
    """The ChaCha20 keystream of one seed, read in order."""

    def __init__(self, seed: bytes) -> None:
        key = hashlib.sha256(DOMAIN + bytes(seed)).digest()
        self._cipher = Cipher(algorithms.ChaCha20(key, b"\x00" * 16), mode=None).encryptor()

    def words(self, count: int, dtype: str) -> np.ndarray:
        size = np.dtype(dtype).itemsize
        return np.frombuffer(self._cipher.update(b"\x00" * (count * size)), dtype=dtype).copy()


def _uniform(stream: _Stream, count: int, num_range: int) -> np.ndarray:
    """`count` independent uniform integers in [0, num_range) as int64."""
    if num_range & (num_range - 1) == 0:  # a power of two: keep the low bits of each word, no bias
        dtype = "<u4" if num_range <= 2**32 else "<u8"
        return (stream.words(count, dtype) & np.array(num_range - 1, dtype=dtype)).astype(np.int64)
    limit = 2**64 - (2**64 % num_range)  # accept words below the largest multiple of num_range
    out = np.empty(0, dtype=np.uint64)
    while out.size < count:
        need = count - out.size
        words = stream.words(need + need // 8 + 8, "<u8")
        out = np.concatenate([out, words[words < np.uint64(limit)][:need]])
    return (out % np.uint64(num_range)).astype(np.int64)


def secure_prg(seed: bytes, num_range: int, dimensions_list: Sequence[tuple[int, ...]]) -> list[np.ndarray]:
    """Drop-in for Flower's `pseudo_rand_gen`: one int64 array per shape in `dimensions_list`, uniform in
    [0, num_range), all drawn in order from the keystream of the full `seed`."""
    if not isinstance(seed, (bytes, bytearray)) or len(seed) < 16:
        raise ValueError(f"mask seed: expected at least 16 bytes, got {type(seed).__name__} of length "
                         f"{len(seed) if hasattr(seed, '__len__') else '?'}")
    if not isinstance(num_range, (int, np.integer)) or not 2 <= int(num_range) <= 2**63:
        raise ValueError(f"num_range = {num_range!r}: expected an integer in [2, 2^63]")
    stream, num_range = _Stream(seed), int(num_range)
    output = []
    for shape in dimensions_list:
        shape = tuple(shape)
        values = _uniform(stream, int(np.prod(shape, dtype=np.int64)), num_range)
        output.append(np.array(values[0], dtype=np.int64) if shape == () else values.reshape(shape))
    return output


def flower_prg():
    """Flower's own `pseudo_rand_gen` (kept for tests that show what it does)."""
    return _ORIGINAL


def _modules():
    return [importlib.import_module(name) for name in FLOWER_PRG_MODULES]


_ORIGINAL = importlib.import_module(FLOWER_PRG_MODULES[0]).pseudo_rand_gen


def install() -> None:
    """Replace Flower's `pseudo_rand_gen` with `secure_prg` in the modules above and in any other loaded
    Flower module that imported it by name. Idempotent; checked by `installed()`."""
    for module in _modules():
        module.pseudo_rand_gen = secure_prg
    for module in _importers():
        module.pseudo_rand_gen = secure_prg
    if not installed():
        raise RuntimeError("avrec: could not install the cryptographic SecAgg+ mask PRG in every Flower module")


def installed() -> bool:
    """True when no loaded Flower module still calls Flower's 32-bit PRG."""
    return all(m.pseudo_rand_gen is secure_prg for m in _modules()) and not _importers()


def _importers() -> list:
    """Loaded Flower modules whose namespace still holds Flower's PRG (read from __dict__: no lazy attributes
    run). Only `flwr.*`: other code that imported it on purpose (a test showing what it does) keeps it."""
    return [m for name, m in list(sys.modules.items())
            if (name == "flwr" or name.startswith("flwr.")) and isinstance(getattr(m, "__dict__", None), dict)
            and m.__dict__.get("pseudo_rand_gen") is _ORIGINAL]
