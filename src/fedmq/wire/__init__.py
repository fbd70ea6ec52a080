"""The versioned msgpack envelopes fedmq sends over the broker (never pickle).

``encode_update`` / ``encode_model`` turn envelopes into deterministic bytes;
``decode_update`` / ``decode_model`` parse untrusted bytes strictly and within
``WireLimits``, raising ``WireError`` (with a machine-readable ``Reason``) and nothing
else; ``materialize`` decodes the tensors. The format is specified byte for byte in
docs/wire-format.md; ``python -m fedmq.wire.fuzz`` fuzzes the decoder at length.

Signing (``fedmq.signed/1``): a ``Signer`` seals encoded bytes with an Ed25519 key, a
``Verifier`` checks them against a ``KeyRing`` (``open_update``, ``open_model``,
``open_signed``). Operator commands travel as ``fedmq.control/1``; a device's evaluation
report as ``fedmq.eval/1`` (``encode_eval``, ``decode_eval``, ``open_eval``).
"""

from fedmq.wire._control import (
    CONTROL_LIMITS,
    SCHEMA_CONTROL,
    ControlCommand,
    ControlEnvelope,
    ControlValue,
    decode_control,
    encode_control,
)
from fedmq.wire._decode import decode_model, decode_update, materialize, materialize_sparse
from fedmq.wire._delta import (
    SCHEMA_MODEL_DELTA,
    ModelDeltaEnvelope,
    decode_any_model,
    encode_model_delta,
)
from fedmq.wire._encode import encode_model, encode_update
from fedmq.wire._envelope import (
    PRIVACY_MECHANISMS,
    SCHEMA_MODEL,
    SCHEMA_UPDATE,
    ModelEnvelope,
    PrivacySpend,
    TensorSpec,
    UpdateEnvelope,
    WireLimits,
    tensor_spec_of,
)
from fedmq.wire._eval import (
    EVAL_LIMITS,
    MAX_METRICS,
    METRIC_NAME_PATTERN,
    METRIC_NAME_RULE,
    SCHEMA_EVAL,
    EvalEnvelope,
    check_metric_name,
    decode_eval,
    encode_eval,
    is_metric_name,
    open_eval,
)
from fedmq.wire._ids import (
    MAX_PARTICIPANT_ID,
    PARTICIPANT_ID_PATTERN,
    PARTICIPANT_ID_RULE,
    check_participant_id,
    is_participant_id,
)
from fedmq.wire._keys import (
    KeyRing,
    PrivateKey,
    create_key_pair,
    fingerprint,
    key_owner,
    load_private_key,
    load_public_key,
    register_public_key,
)
from fedmq.wire._limits import message_limit_for
from fedmq.wire._signed import (
    SCHEMA_SIGNED,
    SignedEnvelope,
    Signer,
    Verifier,
    decode_signed,
    encode_signed,
    is_signed,
    open_model,
    open_signed,
    open_update,
    seal,
)

__all__ = [
    "CONTROL_LIMITS",
    "EVAL_LIMITS",
    "MAX_METRICS",
    "MAX_PARTICIPANT_ID",
    "METRIC_NAME_PATTERN",
    "METRIC_NAME_RULE",
    "PARTICIPANT_ID_PATTERN",
    "PARTICIPANT_ID_RULE",
    "PRIVACY_MECHANISMS",
    "SCHEMA_CONTROL",
    "SCHEMA_EVAL",
    "SCHEMA_MODEL",
    "SCHEMA_MODEL_DELTA",
    "SCHEMA_SIGNED",
    "SCHEMA_UPDATE",
    "ControlCommand",
    "ControlEnvelope",
    "ControlValue",
    "EvalEnvelope",
    "KeyRing",
    "ModelDeltaEnvelope",
    "ModelEnvelope",
    "PrivacySpend",
    "PrivateKey",
    "SignedEnvelope",
    "Signer",
    "TensorSpec",
    "UpdateEnvelope",
    "Verifier",
    "WireLimits",
    "check_metric_name",
    "check_participant_id",
    "create_key_pair",
    "decode_any_model",
    "decode_control",
    "decode_eval",
    "decode_model",
    "decode_signed",
    "decode_update",
    "encode_control",
    "encode_eval",
    "encode_model",
    "encode_model_delta",
    "encode_signed",
    "encode_update",
    "fingerprint",
    "is_metric_name",
    "is_participant_id",
    "is_signed",
    "key_owner",
    "load_private_key",
    "load_public_key",
    "materialize",
    "materialize_sparse",
    "message_limit_for",
    "open_eval",
    "open_model",
    "open_signed",
    "open_update",
    "register_public_key",
    "seal",
    "tensor_spec_of",
]
