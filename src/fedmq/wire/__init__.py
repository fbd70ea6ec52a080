"""The versioned msgpack envelopes fedmq sends over the broker (never pickle).

``encode_update`` / ``encode_model`` turn envelopes into deterministic bytes;
``decode_update`` / ``decode_model`` parse untrusted bytes strictly and within
``WireLimits``, raising ``WireError`` (with a machine-readable ``Reason``) and nothing
else; ``materialize`` decodes the tensors. The format is specified byte for byte in
docs/wire-format.md; ``python -m fedmq.wire.fuzz`` fuzzes the decoder at length.
"""

from fedmq.wire._decode import decode_model, decode_update, materialize
from fedmq.wire._encode import encode_model, encode_update
from fedmq.wire._envelope import (
    SCHEMA_MODEL,
    SCHEMA_UPDATE,
    ModelEnvelope,
    TensorSpec,
    UpdateEnvelope,
    WireLimits,
    tensor_spec_of,
)

__all__ = [
    "SCHEMA_MODEL",
    "SCHEMA_UPDATE",
    "ModelEnvelope",
    "TensorSpec",
    "UpdateEnvelope",
    "WireLimits",
    "decode_model",
    "decode_update",
    "encode_model",
    "encode_update",
    "materialize",
    "tensor_spec_of",
]
