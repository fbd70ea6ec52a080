"""The signed envelope ``fedmq.signed/1``: an update, a model, a report or a command, wrapped
with an Ed25519 signature.

    {"schema": "fedmq.signed/1", "key_id": str, "body": bin, "sig": bin (64 bytes)}

``body`` is a complete envelope (e.g. ``fedmq.update/1`` or ``fedmq.model/1``), byte for byte,
so the signature covers everything in it (participant, seq, base version, tensors...).
``sig`` is Ed25519 (RFC 8032) over the *signed message*::

    "fedmq.signed/1" 0x00 <job> 0x00 <key_id> 0x00 <body>

which binds the signature to the job and to the key id as well: a signed update cannot
be replayed into another job, nor relabelled with another key id.

Receivers: with keys configured (a ``Verifier``), an unsigned message is refused
(``unsigned``), a key id the registry does not hold is ``unknown_key``, a signature
that does not verify is ``bad_signature``, and an update signed by a key of another
participant is ``participant_mismatch``. Without keys configured, a signed message is
unwrapped without verification (unsigned ones are accepted anyway), so signing can be
rolled out sender by sender. Replays of a validly signed update are refused by the
aggregator's (participant, seq) deduplication as ``duplicate``.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import msgpack
from cryptography.exceptions import InvalidSignature

from fedmq.errors import ConfigError, Reason
from fedmq.wire._decode import _envelope, _fail, decode_model, decode_update
from fedmq.wire._envelope import ModelEnvelope, TensorSpec, UpdateEnvelope, WireLimits
from fedmq.wire._keys import (
    MAX_KEY_ID_BYTES,
    KeyRing,
    PrivateKey,
    check_key_id,
    key_owner,
    load_private_key,
)

__all__ = [
    "SCHEMA_SIGNED",
    "SIGNATURE_BYTES",
    "SignedEnvelope",
    "Signer",
    "Verifier",
    "check_signer",
    "decode_signed",
    "encode_signed",
    "is_signed",
    "open_model",
    "open_signed",
    "open_update",
    "seal",
    "signed_message",
]

SCHEMA_SIGNED = "fedmq.signed/1"
SIGNATURE_BYTES = 64
_SIGNED_FIELDS = ("schema", "key_id", "body", "sig")
_DEFAULT_LIMITS = WireLimits()
_PEEK_KEYS = 16  # as the decoder's map bound


@dataclass(frozen=True, kw_only=True)
class SignedEnvelope:
    """A signed message: ``body`` (an encoded envelope) and its signature by ``key_id``."""

    key_id: str
    body: bytes
    sig: bytes


def signed_message(job: str, key_id: str, body: bytes) -> bytes:
    """The bytes the signature covers: schema, job, key id (NUL-separated), then the body."""
    return b"\0".join((SCHEMA_SIGNED.encode(), job.encode(), key_id.encode(), body))


def encode_signed(env: SignedEnvelope) -> bytes:
    """Serialize a signed envelope (keys in the documented order; deterministic)."""
    check_key_id(env.key_id)
    if not isinstance(env.body, bytes) or not isinstance(env.sig, bytes):
        raise ValueError("body and sig must be bytes")
    if len(env.sig) != SIGNATURE_BYTES:
        raise ValueError(f"sig: {len(env.sig)} bytes, an Ed25519 signature has 64")
    packed = msgpack.packb(
        {"schema": SCHEMA_SIGNED, "key_id": env.key_id, "body": env.body, "sig": env.sig},
        use_bin_type=True,
    )
    assert isinstance(packed, bytes)
    return packed


def decode_signed(data: bytes, *, limits: WireLimits = _DEFAULT_LIMITS) -> SignedEnvelope:
    """Parse a ``fedmq.signed/1`` envelope strictly; ``WireError`` and nothing else.

    The body is not decoded here, and the signature not verified (``Verifier.open``).
    """
    fields = _envelope(data, SCHEMA_SIGNED, _SIGNED_FIELDS, limits)
    key_id = fields["key_id"]
    if not isinstance(key_id, str):
        _fail(Reason.WRONG_TYPE, f"key_id: expected a str, got {type(key_id).__name__}")
    if len(key_id.encode()) > MAX_KEY_ID_BYTES:
        _fail(Reason.TOO_LARGE, f"key_id: longer than {MAX_KEY_ID_BYTES} bytes")
    try:
        check_key_id(key_id)
    except ConfigError:
        _fail(Reason.WRONG_TYPE, f"key_id: {key_id!r} is not OWNER or OWNER.LABEL")
    body, sig = fields["body"], fields["sig"]
    if not isinstance(body, bytes):
        _fail(Reason.WRONG_TYPE, f"body: expected bin, got {type(body).__name__}")
    if not isinstance(sig, bytes):
        _fail(Reason.WRONG_TYPE, f"sig: expected bin, got {type(sig).__name__}")
    if len(sig) != SIGNATURE_BYTES:
        _fail(Reason.BAD_SIGNATURE, f"sig: {len(sig)} bytes, an Ed25519 signature has 64")
    return SignedEnvelope(key_id=key_id, body=body, sig=sig)


def is_signed(data: bytes) -> bool:
    """Whether ``data`` is a map whose ``schema`` is ``fedmq.signed/1`` (cheap: reads no bin)."""
    unpacker = msgpack.Unpacker(io.BytesIO(data), raw=False, max_buffer_size=len(data) + 1)
    try:
        entries = unpacker.read_map_header()
        for _ in range(min(entries, _PEEK_KEYS)):
            if unpacker.unpack() == "schema":
                return bool(unpacker.unpack() == SCHEMA_SIGNED)
            unpacker.skip()
    except Exception:  # not a map, truncated...: the real decoder says why
        return False
    return False


@dataclass(frozen=True, eq=False)
class Signer:
    """Signs what this process sends in ``job`` with its private key."""

    key: PrivateKey
    job: str

    @classmethod
    def from_file(cls, path: Path, job: str) -> Signer:
        return cls(load_private_key(path), job)

    @property
    def key_id(self) -> str:
        return self.key.key_id

    def seal(self, body: bytes) -> bytes:
        """``body`` wrapped in a signed envelope."""
        sig = self.key.key.sign(signed_message(self.job, self.key_id, body))
        return encode_signed(SignedEnvelope(key_id=self.key_id, body=body, sig=sig))


def seal(body: bytes, signer: Signer | None) -> bytes:
    """``body`` signed by ``signer``, or unchanged when signing is off (``None``)."""
    return body if signer is None else signer.seal(body)


@dataclass(frozen=True, eq=False)
class Verifier:
    """Checks signed messages of ``job`` against the public keys of ``keys``."""

    keys: KeyRing
    job: str

    def verify(self, env: SignedEnvelope) -> None:
        """Raise ``WireError`` (unknown_key, bad_signature) unless ``env`` verifies."""
        public = self.keys.get(env.key_id)
        if public is None:
            _fail(Reason.UNKNOWN_KEY, f"key {env.key_id!r} is not registered")
        try:
            public.verify(env.sig, signed_message(self.job, env.key_id, env.body))
        except InvalidSignature:
            _fail(Reason.BAD_SIGNATURE, f"signature by key {env.key_id!r} does not verify")


def open_signed(
    data: bytes, *, verifier: Verifier | None, limits: WireLimits = _DEFAULT_LIMITS
) -> tuple[bytes, str | None]:
    """The inner body of a message, signed or not, and the id of the key that verified it.

    With ``verifier``: ``unsigned``, ``unknown_key`` or ``bad_signature`` unless signed by
    a registered key. Without: a signed message is unwrapped unverified (key id None).
    Anything else about the bytes is left to the decoder of the body.
    """
    if not is_signed(data):
        if verifier is not None:
            _fail(Reason.UNSIGNED, f"not a {SCHEMA_SIGNED} envelope, and signatures are required")
        return data, None
    env = decode_signed(data, limits=limits)
    if verifier is None:
        return env.body, None  # no keys configured: unsigned is accepted too
    verifier.verify(env)
    return env.body, env.key_id


def check_signer(key_id: str | None, participant: str, what: str) -> None:
    """``participant_mismatch`` unless the key that verified a participant's ``what``
    (an update, a report) is one that participant owns; nothing if none verified it."""
    if key_id is not None and key_owner(key_id) != participant:
        _fail(
            Reason.PARTICIPANT_MISMATCH,
            f"{what} of {participant!r} signed by key {key_id!r} of {key_owner(key_id)!r}",
        )


def open_update(
    data: bytes,
    *,
    spec: TensorSpec,
    limits: WireLimits = _DEFAULT_LIMITS,
    verifier: Verifier | None = None,
) -> UpdateEnvelope:
    """Verify (if ``verifier``) and decode an update, signed or not; ``WireError`` only.

    A signed update must be signed by a key its participant owns (``dev-01`` or
    ``dev-01.<label>`` for participant ``dev-01``), else ``participant_mismatch``.
    """
    body, key_id = open_signed(data, verifier=verifier, limits=limits)
    update = decode_update(body, spec=spec, limits=limits)
    check_signer(key_id, update.participant, "update")
    return update


def open_model(
    data: bytes,
    *,
    spec: TensorSpec | None = None,
    limits: WireLimits = _DEFAULT_LIMITS,
    verifier: Verifier | None = None,
) -> ModelEnvelope:
    """Verify (if ``verifier``) and decode a model, signed or not; ``WireError`` only."""
    body, _ = open_signed(data, verifier=verifier, limits=limits)
    return decode_model(body, spec=spec, limits=limits)
