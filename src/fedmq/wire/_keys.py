"""Ed25519 key files and the aggregator's registry of device public keys.

A key has an id: a participant id (``dev-01``), optionally followed by a dot and a
label for a rotated key (``dev-01.2025``), or ``aggregator`` for the aggregator's own.
The part before the dot is the key's *owner*: a device may only sign updates that
carry its own participant id.

Files (what ``fedmq keys`` writes):

- ``<key_id>.key``: the private key, PEM (PKCS#8, unencrypted), mode 0600;
- ``<key_id>.pub``: the public key, PEM (SubjectPublicKeyInfo).

Public keys are also read as OpenSSH ``ssh-ed25519 ...`` lines, 32 raw bytes, or 64
hex digits; private keys as 32 raw bytes (the RFC 8032 seed). A ``KeyRing`` is a
folder of ``<key_id>.pub`` files (or one such file), re-read while the service runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from fedmq._fs import atomic_write
from fedmq._log import log_event
from fedmq.errors import ConfigError
from fedmq.wire._ids import PARTICIPANT_ID_PATTERN, PARTICIPANT_ID_RULE

__all__ = [
    "KeyRing",
    "PrivateKey",
    "check_key_id",
    "create_key_pair",
    "fingerprint",
    "key_owner",
    "load_private_key",
    "load_public_key",
    "public_pem",
    "register_public_key",
]

_log = logging.getLogger("fedmq.keys")

MAX_KEY_ID_BYTES = 128
_KEY_ID = re.compile(rf"{PARTICIPANT_ID_PATTERN}(\.[A-Za-z0-9_-]+)?")
_HEX_KEY = re.compile(r"[0-9a-fA-F]{64}")


def check_key_id(key_id: str) -> str:
    """``key_id`` if it is ``owner`` or ``owner.label`` (owner: a participant id), else
    ConfigError."""
    if len(key_id.encode()) > MAX_KEY_ID_BYTES or not _KEY_ID.fullmatch(key_id):
        raise ConfigError(
            f"key id: {key_id!r} must be OWNER or OWNER.LABEL, OWNER a participant id "
            f"({PARTICIPANT_ID_RULE}), LABEL [A-Za-z0-9_-]+, at most {MAX_KEY_ID_BYTES} bytes "
            "(e.g. dev-01, dev-01.2025, aggregator)"
        )
    return key_id


def key_owner(key_id: str) -> str:
    """Who a key belongs to: ``dev-01.2025`` -> ``dev-01``."""
    return key_id.split(".", 1)[0]


def fingerprint(key: Ed25519PublicKey) -> str:
    """A short, stable name of a public key: SHA-256 of its 32 raw bytes, 16 hex digits."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "sha256:" + hashlib.sha256(raw).hexdigest()[:16]


def public_pem(key: Ed25519PublicKey) -> bytes:
    """The PEM (SubjectPublicKeyInfo) text of ``key``."""
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _parse_public(data: bytes, where: str) -> Ed25519PublicKey:
    text = data.strip()
    try:
        if text.startswith(b"-----BEGIN"):
            key: object = serialization.load_pem_public_key(text)
        elif text.startswith(b"ssh-ed25519 "):
            key = serialization.load_ssh_public_key(text)
        elif len(data) == 32:
            key = Ed25519PublicKey.from_public_bytes(data)
        elif _HEX_KEY.fullmatch(text.decode("ascii", "replace")):
            key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(text.decode()))
        else:
            raise ValueError("not PEM, OpenSSH, 32 raw bytes or 64 hex digits")
    except (ValueError, UnsupportedAlgorithm) as error:
        raise ConfigError(f"{where}: not an Ed25519 public key ({error})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{where}: a {type(key).__name__}, not an Ed25519 public key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM, OpenSSH, raw or hex file; ConfigError otherwise."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ConfigError(f"{path}: cannot read the public key ({error.strerror})") from None
    return _parse_public(data, str(path))


@dataclass(frozen=True, eq=False)
class PrivateKey:
    """A private key and its id (the file name without ``.key``)."""

    key_id: str
    key: Ed25519PrivateKey

    @property
    def public(self) -> Ed25519PublicKey:
        return self.key.public_key()


def load_private_key(path: Path) -> PrivateKey:
    """``<key_id>.key`` (PEM PKCS#8 or the 32-byte seed); its id comes from the file name."""
    key_id = check_key_id(path.name.removesuffix(".key"))
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ConfigError(f"{path}: cannot read the private key ({error.strerror})") from None
    try:
        if data.strip().startswith(b"-----BEGIN"):
            key: object = serialization.load_pem_private_key(data, password=None)
        elif len(data) == 32:
            key = Ed25519PrivateKey.from_private_bytes(data)
        else:
            raise ValueError("not PEM and not a 32-byte seed")
    except (ValueError, TypeError, UnsupportedAlgorithm) as error:
        raise ConfigError(f"{path}: not an unencrypted Ed25519 private key ({error})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path}: a {type(key).__name__}, not an Ed25519 private key")
    with contextlib.suppress(OSError):
        if path.stat().st_mode & 0o077:
            log_event(_log, "key_file_too_open", logging.WARNING, path=str(path), fix="chmod 600")
    return PrivateKey(key_id=key_id, key=key)


def create_key_pair(key_id: str, directory: Path) -> tuple[Path, Path]:
    """Write a new ``<key_id>.key`` (0600) and ``<key_id>.pub``; never overwrite a key."""
    check_key_id(key_id)
    directory.mkdir(parents=True, exist_ok=True)
    private_path, public_path = directory / f"{key_id}.key", directory / f"{key_id}.pub"
    for path in (private_path, public_path):
        if path.exists():
            raise ConfigError(f"{path}: exists; refusing to overwrite a key")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # Created 0600 from the start (O_EXCL), so the key is never readable by others.
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
        f.flush()
        os.fsync(f.fileno())
    atomic_write(public_path, public_pem(key.public_key()))
    return private_path, public_path


def register_public_key(key_id: str, public_file: Path, registry: Path) -> tuple[Path, str | None]:
    """Copy a public key into the registry as ``<key_id>.pub`` (PEM).

    Returns the path and the fingerprint of the key it replaced, if any.
    """
    check_key_id(key_id)
    key = load_public_key(public_file)
    registry.mkdir(parents=True, exist_ok=True)
    target = registry / f"{key_id}.pub"
    replaced = None
    if target.exists():
        with contextlib.suppress(ConfigError):
            replaced = fingerprint(load_public_key(target))
    atomic_write(target, public_pem(key))
    return target, replaced


class KeyRing:
    """Public keys by id, from a folder of ``<key_id>.pub`` files or from one file.

    The folder is re-read at most every ``refresh_s`` seconds when a key is looked
    up, so registering, rotating or deleting a key takes effect without a restart.
    A file that is not a valid key is skipped with a warning. Thread-safe.
    """

    def __init__(self, path: Path, *, refresh_s: float = 2.0) -> None:
        if not path.exists():
            raise ConfigError(f"keys: {path} does not exist")
        if not path.is_dir() and not path.name.endswith(".pub"):
            raise ConfigError(f"keys: {path} must be a folder or a file named <key_id>.pub")
        self.path = path
        self._refresh_s = refresh_s
        self._lock = threading.Lock()
        self._keys: dict[str, Ed25519PublicKey] = {}
        self._seen: dict[str, tuple[int, int]] = {}  # file name -> (mtime_ns, size)
        self._loaded_at = -float("inf")
        with self._lock:
            self._reload()
        if not self._keys:
            log_event(_log, "keys_empty", logging.WARNING, path=str(path))

    def __len__(self) -> int:
        with self._lock:
            return len(self._keys)

    def __iter__(self) -> Iterator[str]:
        with self._lock:
            return iter(sorted(self._keys))

    def get(self, key_id: str) -> Ed25519PublicKey | None:
        """The public key ``key_id``, or None if the registry does not hold it (now)."""
        with self._lock:
            if time.monotonic() - self._loaded_at >= self._refresh_s:
                self._reload()
            return self._keys.get(key_id)

    def _files(self) -> list[Path]:
        if self.path.is_dir():
            return sorted(p for p in self.path.iterdir() if p.name.endswith(".pub"))
        return [self.path]

    def _reload(self) -> None:
        self._loaded_at = time.monotonic()
        try:
            files = self._files()
        except OSError as error:  # keep the keys loaded; try again at the next refresh
            log_event(
                _log, "keys_unreadable", logging.WARNING, path=str(self.path), error=str(error)
            )
            return
        keys: dict[str, Ed25519PublicKey] = {}
        seen: dict[str, tuple[int, int]] = {}
        for path in files:
            key_id = path.name.removesuffix(".pub")
            try:
                stat = path.stat()
                stamp = (stat.st_mtime_ns, stat.st_size)
                old = self._keys.get(key_id)
                if old is not None and self._seen.get(path.name) == stamp:
                    keys[key_id], seen[path.name] = old, stamp
                    continue
                check_key_id(key_id)
                keys[key_id], seen[path.name] = load_public_key(path), stamp
            except (OSError, ConfigError) as error:
                log_event(_log, "key_skipped", logging.WARNING, path=str(path), error=str(error))
        added = sorted(keys.keys() - self._keys.keys())
        removed = sorted(self._keys.keys() - keys.keys())
        changed = sorted(k for k in keys.keys() & self._keys.keys() if keys[k] is not self._keys[k])
        if added or removed or changed:
            log_event(
                _log,
                "keys_loaded",
                path=str(self.path),
                keys=len(keys),
                added=added,
                removed=removed,
                changed=changed,
            )
        self._keys, self._seen = keys, seen
