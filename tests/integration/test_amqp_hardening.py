"""Issue 9 over the real RabbitMQ: who an update is from, bytes held in memory and in
the rejected queue, and the TCP options of the broker connections.

The hostile device is played with plain aio-pika (it publishes whatever it likes, as
the login ``guest`` of the shared broker allows); the aggregator is the real service,
in this process or (for memory) as its own ``fedmq aggregator`` process.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from fedmq.aggregator import Aggregator
from fedmq.errors import Reason, RejectedUpdate
from fedmq.transport import TransportConfig, connect_aggregator, connect_participant
from fedmq.transport._common import REJECTED_BODY_MAX
from fedmq.transport.amqp import REJECTED_MAX_BYTES, amqp_names
from tests.integration.aggregators import running
from tests.integration.brokers import delete_job_queues
from tests.integration.test_signing_and_tuning import Process
from tests.updates import delta, update

pytestmark = pytest.mark.amqp


def _config(url: str, job: str, **extra: Any) -> TransportConfig:
    return TransportConfig(
        url=url, job=job, max_message_bytes=256 * 1024, connect_timeout_s=5.0, **extra
    )


@pytest.fixture
async def clean(amqp_url: str, job: str) -> AsyncIterator[None]:
    yield
    await delete_job_queues(amqp_url, job)


async def handled(aggregator: Aggregator, count: int) -> None:
    async with asyncio.timeout(15):
        while aggregator.stats.received < count:  # noqa: ASYNC110
            await asyncio.sleep(0.02)


async def forge(url: str, job: str, body: bytes, **properties: Any) -> None:
    """Publish ``body`` into the job's updates queue as a hostile device would."""
    async with await aio_pika.connect(url) as connection:
        channel = await connection.channel(publisher_confirms=True)
        await channel.default_exchange.publish(
            aio_pika.Message(body, delivery_mode=2, **properties),
            routing_key=amqp_names(job).updates,
        )


async def first_rejection(url: str, job: str) -> aio_pika.abc.AbstractIncomingMessage:
    """The oldest record in the job's rejected queue (taken off it)."""
    async with await aio_pika.connect(url) as connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(amqp_names(job).rejected, passive=True)
        record = await queue.get(timeout=10)
        assert record is not None
        await record.ack()
        return record


# -- who an update is from --------------------------------------------------------------


@pytest.mark.usefixtures("clean")
async def test_update_without_participant_header_is_refused_and_cannot_block_the_victim(
    amqp_url: str, job: str
) -> None:
    """Before: the header-less spoof as victim-01 with seq 2^64-1 was applied, and the
    victim's own seq 0 was then refused as `duplicate`. Now the spoof is refused."""
    config = _config(amqp_url, job)
    async with running(config) as aggregator:
        await forge(amqp_url, job, update("victim-01", 2**64 - 1, 0, delta(1.0)))
        await forge(amqp_url, job, update("victim-01", 2**64 - 2, 0, delta(1.0)), headers={})
        await handled(aggregator, 2)
        async with connect_participant(config, "victim-01") as victim:
            await victim.publish_update(update("victim-01", 0, 0, delta(1.0)))
            await handled(aggregator, 3)
        stats = aggregator.stats
    assert stats.rejected[Reason.PARTICIPANT_MISMATCH.value] == 2
    assert stats.rejected[Reason.DUPLICATE.value] == 0
    assert stats.applied == 1  # the victim's own update


@pytest.mark.usefixtures("clean")
async def test_login_identity_is_the_broker_verified_user_id(amqp_url: str, job: str) -> None:
    """sender_identity="login": the header is ignored; user_id (checked by RabbitMQ against
    the login, here "guest") must be the envelope's participant."""
    config = _config(amqp_url, job, sender_identity="login")
    async with running(config) as aggregator:
        # The header says victim-01, but the broker says the login is guest.
        await forge(
            amqp_url,
            job,
            update("victim-01", 1, 0, delta(1.0)),
            headers={"participant": "victim-01"},
            user_id="guest",
        )
        await forge(  # no user_id at all
            amqp_url, job, update("victim-01", 2, 0, delta(1.0)), headers={"participant": "x"}
        )
        async with connect_participant(config, "guest") as device:  # its own login
            await device.publish_update(update("guest", 0, 0, delta(1.0)))
            await handled(aggregator, 3)
        stats = aggregator.stats
    assert stats.rejected[Reason.PARTICIPANT_MISMATCH.value] == 2
    assert stats.applied == 1


@pytest.mark.usefixtures("clean")
async def test_participant_process_takes_models_only_from_the_model_publisher(
    amqp_url: str, job: str, tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FEDMQ_MODEL_PUBLISHER reaches the participant's transport (before: no such option,
    so a model appended to the stream by any user was believed)."""
    config = _config(amqp_url, job)
    args = [
        f"--broker={amqp_url}",
        f"--job={job}",
        "--id=dev-01",
        "--shard=0/1",
        "--max-examples=64",
        f"--data-dir={data_dir}",
        f"--state-dir={tmp_path / 'state'}",
    ]
    monkeypatch.setenv("FEDMQ_MODEL_PUBLISHER", "aggregator")
    participant = Process(["participant", *args], tmp_path / "participant.log")
    try:
        async with connect_aggregator(config) as agg:  # logs in as guest, not aggregator
            deadline = time.monotonic() + 90
            while "dropped a model published by user 'guest'" not in participant.text():
                assert participant.popen.poll() is None, participant.text()
                assert time.monotonic() < deadline, participant.text()
                await agg.publish_model(b"not-from-the-aggregator", version=1)
                await asyncio.sleep(0.5)
    finally:
        participant.stop()


# -- bytes held ---------------------------------------------------------------------------


@pytest.mark.usefixtures("clean")
async def test_oversize_update_is_dropped_on_arrival_and_counted_too_large(
    amqp_url: str, job: str
) -> None:
    config = _config(amqp_url, job)
    async with running(config) as aggregator:
        await forge(amqp_url, job, b"\x00" * (config.max_message_bytes + 1))
        await handled(aggregator, 1)
        async with asyncio.timeout(10):
            while aggregator.stats.rejected[Reason.TOO_LARGE.value] < 1:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
    record = await first_rejection(amqp_url, job)
    assert record.headers["reason"] == "too_large"
    assert record.headers["original-size"] == config.max_message_bytes + 1
    assert record.headers["truncated"] is True
    assert record.body == b""  # nothing of it was kept


@pytest.mark.usefixtures("clean")
async def test_in_flight_window_is_bounded_by_bytes(amqp_url: str, job: str) -> None:
    """RabbitMQ has no prefetch_size: the window shrinks to max_inflight_bytes //
    max_message_bytes deliveries (here 3 of a prefetch of 32)."""
    config = _config(amqp_url, job, prefetch=32, max_inflight_bytes=3 * 256 * 1024)
    async with connect_aggregator(config) as agg, connect_participant(config, "p1") as part:
        for i in range(5):
            await part.publish_update(b"u%d" % i)
        updates = aiter(agg.updates())
        async with asyncio.timeout(10):
            held = [await anext(updates) for _ in range(3)]
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.5):
                await anext(updates)
        await held[0].ack()
        async with asyncio.timeout(10):
            assert (await anext(updates)).body == b"u3"


@pytest.mark.usefixtures("clean")
async def test_rejection_records_are_bounded_in_bytes(amqp_url: str, job: str) -> None:
    """Before: each record carried the whole refused body, in a queue unbounded on a bare
    broker. Now: at most REJECTED_BODY_MAX bytes each, the queue x-max-length-bytes."""
    config = _config(amqp_url, job)
    names = amqp_names(job)
    big = os.urandom(200 * 1024)
    async with connect_aggregator(config) as agg, connect_participant(config, "p1") as part:
        await part.publish_update(big)
        delivery = await anext(aiter(agg.updates()))
        await delivery.reject(RejectedUpdate(Reason.NORM_BOUND, "too big a step"))
    record = await first_rejection(amqp_url, job)
    assert record.body == big[:REJECTED_BODY_MAX]
    assert record.headers["original-size"] == len(big)
    assert record.headers["truncated"] is True
    listed = await asyncio.to_thread(
        subprocess.run,
        ["rabbitmqctl", "list_queues", "-q", "--no-table-headers", "name", "arguments"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    line = next(line for line in listed.stdout.splitlines() if line.startswith(names.rejected))
    assert f'{{"x-max-length-bytes",{REJECTED_MAX_BYTES}}}' in line.replace(" ", "")


# -- the aggregator process's memory ------------------------------------------------------

FLOOD = 16  # messages of
FLOOD_BYTES = 16 * 1024 * 1024  # each: far over what the cnn-s model needs (~0.3 MB)
# Allowed growth of the peak RSS over the RSS before the flood: a few floods' messages in
# flight at once (one being assembled by the client, one being dropped), plus allocator
# slack. Before the fix all 16 were held at once, and copied into their rejection records.
PEAK_GROWTH_MAX = 6 * FLOOD_BYTES


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


async def _declared(url: str, name: str) -> Any:
    async with await aio_pika.connect(url) as connection:
        channel = await connection.channel()
        try:
            return (await channel.declare_queue(name, passive=True)).declaration_result
        except aio_pika.exceptions.ChannelClosed:
            return None  # not declared yet


async def _queue_count(url: str, name: str) -> int:
    result = await _declared(url, name)
    return int(result.message_count or 0) if result is not None else 0


async def _consumers(url: str, name: str) -> int:
    result = await _declared(url, name)
    return int(result.consumer_count or 0) if result is not None else 0


@pytest.mark.usefixtures("clean")
async def test_aggregator_process_memory_is_bounded_by_bytes_not_messages(
    amqp_url: str, job: str, tmp_path: Path
) -> None:
    """Before: 16 x 16 MiB refused messages raised the aggregator's peak RSS by ~N x 16 MiB
    (all held at once, each copied into its rejection record). Now each is dropped as
    it arrives, refused as too_large (the default limit is what the model needs)."""
    names = amqp_names(job)
    args = [f"--broker={amqp_url}", f"--job={job}", "--model=cnn-s", "--eval-every=0"]
    process = Process(["aggregator", *args], tmp_path / "aggregator.log")
    try:
        deadline = time.monotonic() + 90
        while await _consumers(amqp_url, names.updates) < 1:  # it is up
            assert process.popen.poll() is None, process.text()
            assert time.monotonic() < deadline, process.text()
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.0)  # the first model publish, the start's allocations
        before = _status_kib(process.popen.pid, "VmRSS")
        body = b"\x01" * FLOOD_BYTES
        async with await aio_pika.connect(amqp_url) as connection:
            channel = await connection.channel(publisher_confirms=True)
            for _ in range(FLOOD):
                await channel.default_exchange.publish(
                    aio_pika.Message(body, delivery_mode=2), routing_key=names.updates
                )
        del body
        deadline = time.monotonic() + 60
        while await _queue_count(amqp_url, names.rejected) < FLOOD:
            assert process.popen.poll() is None, process.text()
            assert time.monotonic() < deadline, process.text()[-3000:]
            await asyncio.sleep(0.2)
        peak = _status_kib(process.popen.pid, "VmHWM")
    finally:
        process.stop()
    growth = (peak - before) * 1024
    print(f"RSS before {before} KiB, peak {peak} KiB, growth {growth / 2**20:.0f} MiB")
    assert growth < PEAK_GROWTH_MAX, f"peak RSS grew {growth / 2**20:.0f} MiB"


# -- TCP options ----------------------------------------------------------------------------


def _sockets_to(port: int) -> list[socket.socket]:
    """This process's TCP sockets connected to ``port`` (duplicates: close them)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            sock = socket.socket(fileno=os.dup(int(fd)))
        except OSError:
            continue
        inet = sock.family in (socket.AF_INET, socket.AF_INET6)
        try:
            if sock.type == socket.SOCK_STREAM and inet and sock.getpeername()[1] == port:
                found.append(sock)
                continue
        except OSError:
            pass
        sock.close()
    return found


@pytest.mark.usefixtures("clean")
async def test_every_amqp_connection_has_tcp_nodelay(amqp_url: str, job: str) -> None:
    """Nagle's algorithm would hold each small ack or confirm back ~40 ms (MQTT before the
    fix: 44 ms per refusal). asyncio's socket transport sets TCP_NODELAY; pinned here."""
    config = _config(amqp_url, job)
    port = int(amqp_url.rsplit(":", 1)[1].split("/")[0])
    async with connect_aggregator(config), connect_participant(config, "p1"):
        sockets = _sockets_to(port)
        try:
            assert len(sockets) >= 2  # the aggregator's and the participant's
            for sock in sockets:
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        finally:
            for sock in sockets:
                sock.close()
