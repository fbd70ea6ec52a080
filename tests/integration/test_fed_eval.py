"""Federated evaluation over the real brokers: devices' reports reach the aggregator,
are combined by examples (hand-computed), and bad ones are counted, not taken."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fedmq.aggregator import Aggregator, AggregatorConfig, FedEvalConfig
from fedmq.tasks import Metric
from fedmq.transport import TransportConfig, connect_aggregator, connect_participant
from fedmq.wire import EvalEnvelope, KeyRing, Signer, Verifier, create_key_pair, encode_eval
from tests.integration.aggregators import FEDASYNC
from tests.updates import INITIAL

RMSE = Metric("rmse", higher_is_better=False)


def report(pid: str, n: int, rmse: float, version: int = 0) -> bytes:
    return encode_eval(
        EvalEnvelope(
            participant=pid,
            version=version,
            num_examples=n,
            metrics={"rmse": rmse, "mae": rmse / 2},
            created=time.time(),
        )
    )


@asynccontextmanager
async def aggregator_of(
    transport: TransportConfig, config: AggregatorConfig
) -> AsyncIterator[Aggregator]:
    async with connect_aggregator(transport) as link, asyncio.TaskGroup() as tg:
        aggregator = Aggregator(config, link, INITIAL, target=RMSE)
        task = tg.create_task(aggregator.run(tg), name="aggregator")
        yield aggregator
        task.cancel()


async def wait_for(condition: object, what: str, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def _config(**changes: object) -> AggregatorConfig:
    return AggregatorConfig(
        strategy=FEDASYNC,
        eval_every=0,
        publish_interval_s=0.0,
        fed_eval=FedEvalConfig(window=0, min_devices=2),
        **changes,  # type: ignore[arg-type]
    )


async def test_reports_are_combined_by_examples(broker: str, job: str) -> None:
    transport = TransportConfig(url=broker, job=job)
    async with (
        aggregator_of(transport, _config()) as aggregator,
        connect_participant(transport, "dev-01") as one,
        connect_participant(transport, "dev-02") as two,
    ):
        await one.publish_eval(report("dev-01", 100, 2.0))
        await two.publish_eval(report("dev-02", 300, 4.0))
        await wait_for(lambda: aggregator.stats.latest("federated") is not None, "a fleet value")
        point = aggregator.stats.latest("federated")
        assert point is not None
        # (100 x 2.0 + 300 x 4.0) / 400 = 3.5; the MAE likewise, (100 x 1 + 300 x 2) / 400.
        assert point.metrics == {"rmse": 3.5, "mae": 1.75}
        assert (point.devices, point.examples, point.version) == (2, 400, 0)
        assert aggregator.stats.latest_target == 3.5  # no central set: the fleet's word
        per_device = aggregator.fed_eval.per_device("rmse")
        assert {pid: r.value for pid, r in per_device.items()} == {"dev-01": 2.0, "dev-02": 4.0}


async def test_bad_reports_are_counted_and_the_service_goes_on(broker: str, job: str) -> None:
    transport = TransportConfig(url=broker, job=job)
    async with (
        aggregator_of(transport, _config()) as aggregator,
        connect_participant(transport, "dev-01") as device,
    ):
        await device.publish_eval(b"\x93not an eval report")
        await device.publish_eval(report("dev-01", 10, 1.0, version=99))  # no such model yet
        await device.publish_eval(report("dev-02", 10, 1.0))  # somebody else's name
        rejected = aggregator.stats.eval_rejected
        await wait_for(lambda: sum(rejected.values()) == 3, "three refusals")
        assert rejected["future_base"] == 1
        assert rejected["participant_mismatch"] == 1
        assert rejected["undecodable"] + rejected["unknown_schema"] + rejected["wrong_type"] == 1
        await device.publish_eval(report("dev-01", 10, 1.0))  # a good one is still taken
        await wait_for(lambda: aggregator.stats.eval_reports == 1, "the good report")
        assert aggregator.fed_eval.devices == 1


async def test_with_device_keys_only_signed_reports_count(
    broker: str, job: str, tmp_path: Path
) -> None:
    keys = tmp_path / "keys"
    create_key_pair("dev-01", tmp_path / "device")
    keys.mkdir()
    (keys / "dev-01.pub").write_bytes((tmp_path / "device" / "dev-01.pub").read_bytes())
    signer = Signer.from_file(tmp_path / "device" / "dev-01.key", job)
    transport = TransportConfig(url=broker, job=job)
    config = _config(update_verifier=Verifier(KeyRing(keys), job))
    async with (
        aggregator_of(transport, config) as aggregator,
        connect_participant(transport, "dev-01") as device,
    ):
        await device.publish_eval(report("dev-01", 10, 1.0))  # unsigned
        await device.publish_eval(signer.seal(report("dev-01", 10, 2.0)))
        await wait_for(lambda: aggregator.stats.eval_reports == 1, "the signed report")
        await wait_for(lambda: aggregator.stats.eval_rejected["unsigned"] == 1, "the refusal")
        held = aggregator.fed_eval.per_device("rmse")["dev-01"]
        assert held.value == 2.0


async def test_the_last_report_of_a_burst_is_recorded_without_waiting_for_more(
    broker: str, job: str
) -> None:
    # Points are at most one a second: a report inside that second is recorded when it
    # is up, not left out until some later report arrives.
    transport = TransportConfig(url=broker, job=job)
    config = dataclasses.replace(_config(), fed_eval=FedEvalConfig(window=0, min_devices=1))
    async with (
        aggregator_of(transport, config) as aggregator,
        connect_participant(transport, "dev-01") as one,
        connect_participant(transport, "dev-02") as two,
    ):
        await one.publish_eval(report("dev-01", 100, 2.0))
        await wait_for(lambda: aggregator.stats.latest("federated") is not None, "a first point")
        await two.publish_eval(report("dev-02", 300, 4.0))  # within the second
        await wait_for(
            lambda: aggregator.stats.latest_target == 3.5, "the point with both devices", 5.0
        )
        point = aggregator.stats.latest("federated")
        assert point is not None and point.devices == 2
