"""Signed updates and models: key files, the envelope, every refusal, the service and the device."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import stat
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedmq.aggregator import Aggregator, AggregatorConfig
from fedmq.cli import main
from fedmq.codecs import CodecConfig, encode_params
from fedmq.errors import ConfigError, Reason, WireError
from fedmq.models import build_model, get_params
from fedmq.participant import Participant, ParticipantConfig
from fedmq.strategies import FedAsyncConfig, StalenessConfig, StrategyConfig
from fedmq.transport import TransportConfig, connect_aggregator, connect_participant
from fedmq.transport.embedded import embedded_broker
from fedmq.wire import (
    SCHEMA_SIGNED,
    KeyRing,
    ModelEnvelope,
    PrivateKey,
    SignedEnvelope,
    Signer,
    Verifier,
    create_key_pair,
    decode_signed,
    encode_model,
    encode_signed,
    fingerprint,
    load_private_key,
    load_public_key,
    open_model,
    open_signed,
    open_update,
    register_public_key,
    tensor_spec_of,
)
from fedmq.wire.fuzz import mutate
from tests import tasks, updates
from tests.unit.test_aggregator import settled
from tests.updates import INITIAL, delta

SPEC = tensor_spec_of(INITIAL)
# RFC 8032, test 1: anyone can check fedmq's signatures against it.
RFC_SEED = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
RFC_PUBLIC = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"


def key(key_id: str, seed: int) -> PrivateKey:
    return PrivateKey(key_id, Ed25519PrivateKey.from_private_bytes(bytes([seed]) * 32))


def ring(tmp_path: Path, *keys: PrivateKey, refresh_s: float = 2.0) -> KeyRing:
    folder = tmp_path / "registry"
    folder.mkdir(parents=True, exist_ok=True)
    for k in keys:
        pem = k.public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        (folder / f"{k.key_id}.pub").write_bytes(pem)
    return KeyRing(folder, refresh_s=refresh_s)


def update(pid: str, seq: int) -> bytes:
    return updates.update(pid, seq, 0, delta(1.0))


DEV1, DEV1_NEW, DEV2, ROGUE, AGG = (
    key("dev-01", 1),
    key("dev-01.2025", 2),
    key("dev-02", 3),
    key("dev-01", 4),  # claims dev-01's id, but it is not dev-01's key
    key("aggregator", 5),
)


def reason_of(call: object) -> Reason:
    assert callable(call)
    with pytest.raises(WireError) as caught:
        call()
    return caught.value.reason


# -- key files ----------------------------------------------------------------------------


def test_create_writes_a_private_key_only_its_owner_can_read(tmp_path: Path) -> None:
    private, public = create_key_pair("dev-01", tmp_path / "keys")
    assert (private.name, public.name) == ("dev-01.key", "dev-01.pub")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    loaded = load_private_key(private)
    assert loaded.key_id == "dev-01"
    assert fingerprint(loaded.public) == fingerprint(load_public_key(public))
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        create_key_pair("dev-01", tmp_path / "keys")


@pytest.mark.parametrize("bad", ["", "dev 01", "a.b.c", "dev/01", "x" * 129])
def test_key_ids_are_owner_or_owner_dot_label(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ConfigError, match="key id"):
        create_key_pair(bad, tmp_path)


def test_public_keys_are_read_in_every_documented_form(tmp_path: Path) -> None:
    private = Ed25519PrivateKey.from_private_bytes(RFC_SEED)
    public = private.public_key()
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert raw.hex() == RFC_PUBLIC
    forms = {
        "pem.pub": public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        "ssh.pub": public.public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        ),
        "raw.pub": raw,
        "hex.pub": RFC_PUBLIC.encode() + b"\n",
    }
    for name, data in forms.items():
        (tmp_path / name).write_bytes(data)
        assert fingerprint(load_public_key(tmp_path / name)) == fingerprint(public)
    (tmp_path / "seed.key").write_bytes(RFC_SEED)
    assert fingerprint(load_private_key(tmp_path / "seed.key").public) == fingerprint(public)
    (tmp_path / "junk.pub").write_bytes(b"hello")
    with pytest.raises(ConfigError, match="not an Ed25519 public key"):
        load_public_key(tmp_path / "junk.pub")


def test_register_copies_the_key_into_the_registry_and_reports_a_replacement(
    tmp_path: Path,
) -> None:
    _, first = create_key_pair("dev-01", tmp_path / "a")
    _, second = create_key_pair("dev-01", tmp_path / "b")
    target, replaced = register_public_key("dev-01", first, tmp_path / "registry")
    assert target == tmp_path / "registry" / "dev-01.pub" and replaced is None
    _, replaced = register_public_key("dev-01", second, tmp_path / "registry")
    assert replaced == fingerprint(load_public_key(first))


def test_keyring_picks_up_registered_and_deleted_keys_without_a_restart(tmp_path: Path) -> None:
    keys = ring(tmp_path, DEV1, refresh_s=0.0)
    assert keys.get("dev-01") is not None and keys.get("dev-02") is None
    (tmp_path / "registry" / "not-a-key.pub").write_bytes(b"junk")  # skipped, logged
    register_public_key("dev-02", _pub_file(tmp_path, DEV2), tmp_path / "registry")
    assert keys.get("dev-02") is not None
    (tmp_path / "registry" / "dev-01.pub").unlink()  # revoked
    assert keys.get("dev-01") is None
    assert list(keys) == ["dev-02"]


def _pub_file(tmp_path: Path, k: PrivateKey) -> Path:
    path = tmp_path / f"{k.key_id}-export.pub"
    path.write_bytes(
        k.public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )
    return path


def test_keys_command_creates_and_registers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, registry = tmp_path / "device", tmp_path / "registry"
    assert main(["keys", "create", "--id", "dev-07", "--out", str(out)]) == 0
    assert stat.S_IMODE((out / "dev-07.key").stat().st_mode) == 0o600
    pub = str(out / "dev-07.pub")
    assert (
        main(["keys", "register", "--id", "dev-07", "--pub", pub, "--keys-dir", str(registry)]) == 0
    )
    assert main(["keys", "list", "--keys-dir", str(registry)]) == 0
    printed = capsys.readouterr().out
    assert "registered dev-07" in printed and "dev-07" in printed.splitlines()[-1]
    assert main(["keys", "create", "--id", "dev-07", "--out", str(out)]) == 2  # no overwrite


# -- the envelope -------------------------------------------------------------------------


def test_seal_round_trip_and_the_signature_covers_job_key_id_and_body() -> None:
    signer = Signer(PrivateKey("dev-0001", Ed25519PrivateKey.from_private_bytes(RFC_SEED)), "j")
    body = update("dev-0001", 7)
    sealed = signer.seal(body)
    assert sealed == signer.seal(body)  # Ed25519 is deterministic
    env = decode_signed(sealed)
    assert (env.key_id, env.body, len(env.sig)) == ("dev-0001", body, 64)
    message = b"fedmq.signed/1\0j\0dev-0001\0" + body
    signer.key.public.verify(env.sig, message)  # raises if not
    assert msgpack.unpackb(sealed)["schema"] == SCHEMA_SIGNED


def _fields(sealed: bytes) -> dict[str, object]:
    fields = msgpack.unpackb(sealed)
    assert isinstance(fields, dict)
    return fields


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda f: f.pop("sig"), Reason.MISSING_FIELD),
        (lambda f: f.update(extra=1), Reason.EXTRA_FIELD),
        (lambda f: f.update(key_id=b"dev-01"), Reason.WRONG_TYPE),
        (lambda f: f.update(key_id="dev 01"), Reason.WRONG_TYPE),
        (lambda f: f.update(key_id="a.b.c"), Reason.WRONG_TYPE),
        (lambda f: f.update(body="text"), Reason.WRONG_TYPE),
        (lambda f: f.update(sig="x" * 64), Reason.WRONG_TYPE),
        (lambda f: f.update(sig=b"x" * 63), Reason.BAD_SIGNATURE),
        (lambda f: f.update(schema="fedmq.signed/2"), Reason.UNKNOWN_SCHEMA),
    ],
)
def test_decoding_is_strict(change: object, reason: Reason) -> None:
    fields = _fields(Signer(DEV1, "j").seal(update("dev-01", 0)))
    assert callable(change)
    change(fields)
    data = msgpack.packb(fields, use_bin_type=True)
    assert reason_of(lambda: decode_signed(data)) == reason


def test_encode_refuses_what_no_receiver_accepts() -> None:
    with pytest.raises(ValueError, match="64"):
        encode_signed(SignedEnvelope(key_id="dev-01", body=b"x", sig=b"short"))
    with pytest.raises(ConfigError):
        encode_signed(SignedEnvelope(key_id="no spaces", body=b"x", sig=bytes(64)))


# -- every refusal --------------------------------------------------------------------------


def test_a_registered_device_key_opens_its_update(tmp_path: Path) -> None:
    verifier = Verifier(ring(tmp_path, DEV1, DEV1_NEW), "j")
    for k in (DEV1, DEV1_NEW):  # its key, and its rotated key dev-01.2025
        opened = open_update(Signer(k, "j").seal(update("dev-01", 3)), spec=SPEC, verifier=verifier)
        assert (opened.participant, opened.seq) == ("dev-01", 3)


def test_refusals_have_the_documented_reasons(tmp_path: Path) -> None:
    verifier = Verifier(ring(tmp_path, DEV1, DEV2), "j")
    body = update("dev-01", 3)
    good = Signer(DEV1, "j").seal(body)
    fields = _fields(good)
    fields["body"] = update("dev-01", 4)  # relabelled seq: the old signature cannot cover it
    relabelled = msgpack.packb(fields, use_bin_type=True)
    tampered = bytearray(good)
    tampered[good.index(b"\x00\x00\x80?")] ^= 0x01  # one bit of one weight
    cases = {
        Reason.UNSIGNED: body,
        Reason.UNKNOWN_KEY: Signer(DEV1_NEW, "j").seal(body),  # not registered
        Reason.BAD_SIGNATURE: Signer(ROGUE, "j").seal(body),  # says dev-01, other key
    }
    for reason, data in cases.items():
        assert reason_of(lambda d=data: open_update(d, spec=SPEC, verifier=verifier)) == reason
    for data in (relabelled, bytes(tampered), Signer(DEV1, "other-job").seal(body)):
        got = reason_of(lambda d=data: open_update(d, spec=SPEC, verifier=verifier))
        assert got == Reason.BAD_SIGNATURE
    # dev-02's own, valid signature on an update that claims to be dev-01's
    stolen = Signer(DEV2, "j").seal(body)
    got = reason_of(lambda: open_update(stolen, spec=SPEC, verifier=verifier))
    assert got == Reason.PARTICIPANT_MISMATCH


def test_without_keys_signed_and_unsigned_updates_both_open() -> None:
    body = update("dev-01", 3)
    assert open_update(body, spec=SPEC).seq == 3
    assert open_update(Signer(DEV1, "j").seal(body), spec=SPEC).seq == 3
    assert open_signed(body, verifier=None) == (body, None)


def test_garbage_never_raises_anything_but_wire_error(tmp_path: Path) -> None:
    verifier = Verifier(ring(tmp_path, DEV1), "j")
    seeds = [Signer(DEV1, "j").seal(update("dev-01", i)) for i in range(3)]
    seeds.append(Signer(AGG, "j").seal(encode_model(_model(1))))
    rnd = random.Random(0)
    outcomes = set()
    for _ in range(3000):
        data = mutate(rnd, seeds)
        for v in (verifier, None):
            try:
                open_update(data, spec=SPEC, verifier=v)
                outcomes.add("accepted")
            except WireError as error:
                outcomes.add(error.reason.value)
    assert {"bad_signature", "undecodable", "accepted"} <= outcomes


def _model(version: int, params: Mapping[str, np.ndarray] = INITIAL) -> ModelEnvelope:
    tensors = tuple(encode_params(params, CodecConfig(name="float32")))
    return ModelEnvelope(version=version, created=time.time(), tensors=tensors)


def test_models_are_verified_with_the_aggregator_key(tmp_path: Path) -> None:
    verifier = Verifier(ring(tmp_path, AGG), "j")
    body = encode_model(_model(4))
    assert open_model(Signer(AGG, "j").seal(body), spec=SPEC, verifier=verifier).version == 4
    assert reason_of(lambda: open_model(body, spec=SPEC, verifier=verifier)) == Reason.UNSIGNED
    forged = Signer(key("aggregator", 9), "j").seal(body)
    assert reason_of(lambda: open_model(forged, verifier=verifier)) == Reason.BAD_SIGNATURE


# -- through the aggregator service -------------------------------------------------------

STRATEGY = StrategyConfig(
    name="fedasync",
    max_staleness=5,
    fedasync=FedAsyncConfig(alpha=0.5, staleness=StalenessConfig(function="constant")),
)


@asynccontextmanager
async def running(config: AggregatorConfig, job: str) -> AsyncIterator[Aggregator]:
    transport_config = TransportConfig(url="memory://signing", job=job)
    async with connect_aggregator(transport_config) as transport, asyncio.TaskGroup() as tg:
        aggregator = Aggregator(config, transport, INITIAL)
        task = tg.create_task(aggregator.run(tg), name="aggregator")
        yield aggregator
        task.cancel()


async def test_the_service_rejects_unsigned_forged_and_replayed_updates(
    tmp_path: Path, job: str
) -> None:
    config = AggregatorConfig(
        strategy=STRATEGY,
        eval_every=0,
        publish_interval_s=0.0,
        update_verifier=Verifier(ring(tmp_path, DEV1), job),
        model_signer=Signer(AGG, job),
    )
    signer = Signer(DEV1, job)
    good = signer.seal(update("dev-01", 1))
    async with running(config, job) as aggregator:
        async with connect_participant(
            TransportConfig(url="memory://signing", job=job), "dev-01"
        ) as p:
            for body in (
                update("dev-01", 0),  # unsigned
                Signer(ROGUE, job).seal(update("dev-01", 0)),  # forged
                good,
                good,  # replayed: the (participant, seq) dedup refuses it
                Signer(DEV1_NEW, job).seal(update("dev-01", 2)),  # key not registered
            ):
                await p.publish_update(body)
        await settled(aggregator, 5)
        assert aggregator.stats.applied == 1 and aggregator.version == 1
        assert aggregator.stats.rejected == {
            "unsigned": 1,
            "bad_signature": 1,
            "duplicate": 1,
            "unknown_key": 1,
        }
        records = embedded_broker("signing").rejected(job)
        assert [r.reason for r in records] == [
            "unsigned",
            "bad_signature",
            "duplicate",
            "unknown_key",
        ]
        async with asyncio.timeout(10):  # the publish of version 1 runs in a task of its own
            while (latest := embedded_broker("signing").latest_model(job)) is None or latest[0] < 1:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        assert latest[0] == 1
        models = Verifier(ring(tmp_path / "agg", AGG), job)
        assert open_model(latest[1], spec=SPEC, verifier=models).version == 1


# -- on the device ------------------------------------------------------------------------


def test_a_device_key_must_be_its_own(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not belong"):
        ParticipantConfig(
            participant_id="dev-02", state_dir=tmp_path, update_signer=Signer(DEV1, "j")
        )
    config = ParticipantConfig(
        participant_id="dev-01", state_dir=tmp_path, update_signer=Signer(DEV1_NEW, "j")
    )
    assert config.update_signer is not None


async def test_a_device_trains_only_on_models_signed_by_the_aggregator(
    tmp_path: Path, job: str
) -> None:
    torch.manual_seed(0)
    model = get_params(build_model("mlp", seed=0))
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    keys = ring(tmp_path, AGG, DEV1)
    config = ParticipantConfig(
        participant_id="dev-01",
        state_dir=tmp_path / "dev-01",
        update_signer=Signer(DEV1, job),
        model_verifier=Verifier(keys, job),
    )
    transport_config = TransportConfig(url="memory://device", job=job)
    async with (
        connect_aggregator(transport_config) as aggregator,
        connect_participant(transport_config, "dev-01") as transport,
        asyncio.TaskGroup() as tg,
    ):
        device = Participant(config, transport, tasks.fmnist(), tasks.device_data(x, y))
        device.start(tg)
        unsigned = encode_model(_model(1, model))
        forged = Signer(key("aggregator", 9), job).seal(encode_model(_model(2, model)))
        for body in (unsigned, forged):
            await aggregator.publish_model(body, version=0)
            async with asyncio.timeout(10):
                while device.stats.models_rejected < (1 if body is unsigned else 2):  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
        assert device.stats.models_received == 0 and device.stats.trained == 0
        await aggregator.publish_model(
            Signer(AGG, job).seal(encode_model(_model(3, model))), version=3
        )
        async with asyncio.timeout(30):
            delivery = await anext(aiter(aggregator.updates()))
        device.stop()
    assert device.stats.models_received == 1 and device.stats.model_version == 3
    # What the device sent is signed with its own key and verifies against the registry.
    opened = open_update(delivery.body, spec=tensor_spec_of(model), verifier=Verifier(keys, job))
    assert (opened.participant, opened.base_version) == ("dev-01", 3)


def test_private_key_files_readable_by_others_are_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    private, _ = create_key_pair("dev-01", tmp_path)
    os.chmod(private, 0o644)
    load_private_key(private)
    assert any("key_file_too_open" in r.getMessage() for r in caplog.records)


def test_signed_envelope_is_a_frozen_value() -> None:
    env = SignedEnvelope(key_id="dev-01", body=b"b", sig=bytes(64))
    with pytest.raises(dataclasses.FrozenInstanceError):
        env.key_id = "x"  # type: ignore[misc]
