"""The default size limit (fedmq.wire.message_limit_for) holds every legitimate message."""

from __future__ import annotations

import time

import numpy as np
import pytest

from fedmq.codecs import CodecConfig, encode_params
from fedmq.models import build_model, get_params
from fedmq.wire import MAX_PARTICIPANT_ID, UpdateEnvelope, encode_update, message_limit_for

WORST = [
    CodecConfig(name="float32"),
    CodecConfig(name="float16"),
    CodecConfig(name="int8", block_size=1),
    CodecConfig(name="int4", block_size=1),
    CodecConfig(name="topk", topk_fraction=1.0, topk_values="float32"),
    CodecConfig(name="topk", topk_fraction=1.0, topk_values="int8", block_size=1),
]


@pytest.mark.parametrize("model", ["cnn-s", "mlp"])
def test_every_codec_at_its_largest_fits_the_limit(model: str) -> None:
    params = get_params(build_model(model, seed=0))  # type: ignore[arg-type]
    rng = np.random.default_rng(0)
    delta = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()}
    limit = message_limit_for(params)
    float32_bytes = sum(v.nbytes for v in params.values())
    assert limit < 3 * float32_bytes  # not 64 MiB: what the model needs
    for codec in WORST:
        body = encode_update(
            UpdateEnvelope(
                participant="d" * MAX_PARTICIPANT_ID,  # the longest id the rule allows
                seq=2**64 - 1,
                base_version=2**63,
                num_examples=2**32,
                loss=1.0,
                created=time.time(),
                tensors=tuple(encode_params(delta, codec)),
            )
        )
        assert len(body) <= limit, (codec, len(body), limit)
