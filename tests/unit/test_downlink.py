"""Model deltas: the device's view stays bit-identical to the aggregator's."""

from __future__ import annotations

import time

import numpy as np
import pytest

from fedmq.aggregator import Downlink, DownlinkConfig
from fedmq.codecs import CodecConfig, encode_params
from fedmq.errors import Reason, WireError
from fedmq.participant._modelsync import ModelView
from fedmq.transport import TransportConfig, connect_aggregator, connect_participant
from fedmq.wire import (
    ModelDeltaEnvelope,
    ModelEnvelope,
    WireLimits,
    decode_any_model,
    encode_model,
    encode_model_delta,
    tensor_spec_of,
)


def _full(version: int, params: object) -> bytes:
    tensors = tuple(encode_params(params, CodecConfig(name="float32")))  # type: ignore[arg-type]
    return encode_model(ModelEnvelope(version=version, created=time.time(), tensors=tensors))


def _params(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "w": rng.normal(size=(8, 16)).astype(np.float32),
        "b": rng.normal(size=(16,)).astype(np.float32),
    }


@pytest.mark.parametrize("codec", ["int4", "int8", "float16"])
def test_device_view_matches_aggregator_view_bit_for_bit(codec: str) -> None:
    rng = np.random.default_rng(0)
    params = _params(rng)
    downlink = Downlink(
        DownlinkConfig(codec=CodecConfig(name=codec), keyframe_every=5),  # type: ignore[arg-type]
        encode_full=_full,
    )
    device = ModelView(tensor_spec_of(params), WireLimits())
    sizes = {True: [], False: []}  # type: dict[bool, list[int]]
    for version in range(12):
        params = {
            k: v + 0.01 * rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()
        }
        body, view, keyframe = downlink.encode(version, params)
        sizes[keyframe].append(len(body))
        accepted = device.accept(body)
        assert accepted is not None and accepted[0] == version
        for name in view:
            assert np.array_equal(accepted[1][name], view[name])
        # the view never drifts from the global model by more than one quantization step
        assert max(float(np.abs(view[k] - params[k]).max()) for k in params) < 0.05
    assert downlink.keyframes == 3 and downlink.deltas == 9  # versions 0, 5, 10 are keyframes
    assert max(sizes[False]) < min(sizes[True])


def test_deltas_apply_on_the_last_keyframe_so_a_missed_one_costs_nothing() -> None:
    rng = np.random.default_rng(1)
    params = _params(rng)
    downlink = Downlink(
        DownlinkConfig(codec=CodecConfig(name="int8"), keyframe_every=3), encode_full=_full
    )
    encoded = []
    for version in range(5):  # keyframe 0, deltas 1 and 2 (base 0), keyframe 3, delta 4 (base 3)
        params = {k: v + 0.01 for k, v in params.items()}
        encoded.append(downlink.encode(version, params))
    bodies = [body for body, _, _ in encoded]
    assert [keyframe for _, _, keyframe in encoded] == [True, False, False, True, False]
    late = ModelView(tensor_spec_of(params), WireLimits())
    assert late.accept(bodies[2]) is None  # a delta, and nothing held
    assert late.accept(bodies[0]) is not None  # the keyframe of version 0
    accepted = late.accept(bodies[2])  # delta 1 was missed: delta 2 applies all the same
    assert accepted is not None and accepted[0] == 2
    assert all(np.array_equal(accepted[1][k], encoded[2][1][k]) for k in params)
    assert late.accept(bodies[4]) is None  # its keyframe (3) is not held: skipped
    assert late.skipped == 2
    assert late.accept(bodies[3]) is not None
    accepted = late.accept(bodies[4])
    assert accepted is not None and accepted[0] == 4
    assert all(np.array_equal(accepted[1][k], encoded[4][1][k]) for k in params)
    assert late.accept(bodies[1]) is None  # older than what is held


def test_no_codec_sends_every_model_in_full() -> None:
    params = _params(np.random.default_rng(2))
    downlink = Downlink(DownlinkConfig(), encode_full=_full)
    for version in range(3):
        _, _, keyframe = downlink.encode(version, params)
        assert keyframe
    assert (downlink.keyframes, downlink.deltas) == (3, 0)


def test_delta_envelope_round_trip_and_checks() -> None:
    params = _params(np.random.default_rng(3))
    spec = tensor_spec_of(params)
    tensors = tuple(encode_params(params, CodecConfig(name="int4")))
    body = encode_model_delta(
        ModelDeltaEnvelope(version=7, base_version=6, created=1.5, tensors=tensors)
    )
    envelope = decode_any_model(body, spec=spec)
    assert isinstance(envelope, ModelDeltaEnvelope)
    assert (envelope.version, envelope.base_version, envelope.created) == (7, 6, 1.5)
    with pytest.raises(WireError) as info:
        decode_any_model(body)  # a delta means nothing without the model it applies to
    assert info.value.reason is Reason.TENSOR_MISMATCH
    with pytest.raises(ValueError):
        encode_model_delta(
            ModelDeltaEnvelope(version=3, base_version=3, created=1.0, tensors=tensors)
        )
    with pytest.raises(WireError) as info:
        decode_any_model(b"\x81\xa6schema\xa3bad", spec=spec)
    assert info.value.reason is Reason.UNKNOWN_SCHEMA


async def test_the_model_kept_for_late_joiners_is_the_last_keyframe() -> None:
    config = TransportConfig(url="memory://downlink", job="keyframes")
    async with connect_aggregator(config) as aggregator:
        await aggregator.publish_model(b"keyframe-1", version=1)
        async with connect_participant(config, "early") as early:
            await aggregator.publish_model(b"delta-2", version=2, keyframe=False)
            models = early.models()
            assert await anext(models) == b"delta-2"  # current subscribers get deltas
        async with connect_participant(config, "late") as late:
            assert await anext(late.models()) == b"keyframe-1"
