"""A service started while its broker is down waits for it (wait_for_broker).

Real Mosquitto on a spare port, started only after the participant is already
trying to connect.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from fedmq.errors import BrokerUnavailable
from fedmq.transport import TransportConfig, connect_participant
from tests.integration.chaos import OwnMosquitto


@pytest.mark.mqtt
async def test_service_waits_for_a_broker_that_starts_later(tmp_path: Path, job: str) -> None:
    broker = OwnMosquitto(tmp_path / "mosquitto")
    fail_fast = TransportConfig(url=broker.url, job=job, connect_timeout_s=0.5)
    with pytest.raises(BrokerUnavailable):
        async with connect_participant(fail_fast, "dev-1"):
            pass
    waiting = TransportConfig(
        url=broker.url, job=job, connect_timeout_s=0.5, reconnect_max_s=0.5, wait_for_broker=True
    )
    entered = asyncio.Event()

    async def device() -> None:
        async with connect_participant(waiting, "dev-1") as transport:
            entered.set()
            await transport.publish_update(b"hello")

    task = asyncio.create_task(device(), name="device")
    await asyncio.sleep(2.0)  # several connect attempts fail meanwhile
    assert not entered.is_set() and not task.done()
    await asyncio.to_thread(broker.start)
    try:
        async with asyncio.timeout(20):
            await task
    finally:
        await asyncio.to_thread(broker.stop)
    assert entered.is_set()
