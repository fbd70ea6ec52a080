"""Update compression: float16, block-wise int8/int4, top-k, and error feedback.

Pure, synchronous numpy (no torch, no I/O). A participant calls ``encode_params`` (or
``ErrorFeedback.encode`` to carry what a lossy codec dropped into the next round); the
aggregator calls ``decode_tensor`` on tensors that came from the network, which raises
``WireError`` and nothing else. The byte layouts are specified in docs/wire-format.md.
"""

from fedmq.codecs._config import CodecConfig, EncodedTensor
from fedmq.codecs._feedback import ErrorFeedback
from fedmq.codecs._registry import (
    decode_tensor,
    decode_tensor_sparse,
    encode_params,
    encode_tensor,
    expected_payload_bytes,
)
from fedmq.codecs._sparse import SparseTensor, add_scaled, dense
from fedmq.codecs._topk import topk_count

__all__ = [
    "CodecConfig",
    "EncodedTensor",
    "ErrorFeedback",
    "SparseTensor",
    "add_scaled",
    "decode_tensor",
    "decode_tensor_sparse",
    "dense",
    "encode_params",
    "encode_tensor",
    "expected_payload_bytes",
    "topk_count",
]
