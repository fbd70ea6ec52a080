"""The embedded ``memory://`` transport, plus the pieces every transport shares (no broker)."""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections.abc import AsyncIterator, Iterator

import pytest

from fedmq.errors import (
    ClosedResourceError,
    ConfigError,
    PayloadTooLarge,
    Reason,
    RejectedUpdate,
)
from fedmq.transport import EvalReport, TransportConfig, connect_aggregator, connect_participant
from fedmq.transport._backoff import Backoff
from fedmq.transport._common import REJECTED_BODY_MAX, redact_url
from fedmq.transport.embedded import (
    EmbeddedAggregator,
    EmbeddedParticipant,
    embedded_broker,
    reset_embedded_brokers,
)
from fedmq.wire import EVAL_LIMITS

LIMIT = 1024


@pytest.fixture(autouse=True)
def _fresh_brokers() -> Iterator[None]:
    reset_embedded_brokers()
    yield
    reset_embedded_brokers()


@pytest.fixture
def config(job: str) -> TransportConfig:
    return TransportConfig(url="memory://unit", job=job, max_message_bytes=LIMIT, prefetch=4)


async def _next(iterator: AsyncIterator[bytes], within: float = 1.0) -> bytes:
    return await asyncio.wait_for(anext(iterator), within)


async def test_update_round_trip_with_ack(config: TransportConfig) -> None:
    async with EmbeddedAggregator(config) as agg, EmbeddedParticipant(config, "p1") as part:
        await part.publish_update(b"u1")
        delivery = await asyncio.wait_for(anext(agg.updates()), 1)
        assert delivery.body == b"u1"
        assert delivery.participant_hint == "p1"
        await delivery.ack()
        with pytest.raises(ClosedResourceError):
            await delivery.ack()  # settle exactly once
    # Acked: nothing comes back for a new aggregator.
    async with EmbeddedAggregator(config) as agg:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(anext(agg.updates()), 0.05)
    assert embedded_broker("unit").queued_updates(config.job) == 0


async def test_factory_picks_embedded(config: TransportConfig) -> None:
    assert isinstance(connect_aggregator(config), EmbeddedAggregator)
    assert isinstance(connect_participant(config, "p1"), EmbeddedParticipant)


async def test_late_joiner_gets_latest_model_at_once(config: TransportConfig) -> None:
    async with EmbeddedAggregator(config) as agg:
        for version in (1, 2, 3):
            await agg.publish_model(b"model-%d" % version, version=version)
        async with EmbeddedParticipant(config, "late") as part:
            assert await _next(part.models()) == b"model-3"
    assert embedded_broker("unit").latest_model(config.job) == (3, b"model-3")


async def test_models_broadcast_and_latest_wins(config: TransportConfig) -> None:
    async with (
        EmbeddedAggregator(config) as agg,
        EmbeddedParticipant(config, "a") as a,
        EmbeddedParticipant(config, "b") as b,
    ):
        await agg.publish_model(b"v1", version=1)
        assert await _next(a.models()) == b"v1"
        # b did not read v1 before v2 came: it only gets the newest.
        await agg.publish_model(b"v2", version=2)
        assert await _next(a.models()) == b"v2"
        assert await _next(b.models()) == b"v2"


async def test_unacked_updates_return_to_the_queue_in_order(config: TransportConfig) -> None:
    async with EmbeddedParticipant(config, "p1") as part:
        for i in range(3):
            await part.publish_update(b"u%d" % i)
        async with EmbeddedAggregator(config) as agg:
            updates = agg.updates()
            first = await anext(updates)
            await first.ack()
            second, third = await anext(updates), await anext(updates)
            assert (second.body, third.body) == (b"u1", b"u2")
        # Settling after the aggregator closed is a no-op, like a dead AMQP channel.
        await second.ack()
        async with EmbeddedAggregator(config) as agg:
            updates = agg.updates()
            again = [await anext(updates), await anext(updates)]
            assert [d.body for d in again] == [b"u1", b"u2"]
            assert all(getattr(d, "redelivered", False) for d in again)
            for d in again:
                await d.ack()


async def test_prefetch_bounds_unacked_deliveries(job: str) -> None:
    config = TransportConfig(url="memory://unit", job=job, prefetch=2)
    async with EmbeddedAggregator(config) as agg, EmbeddedParticipant(config, "p1") as part:
        for i in range(3):
            await part.publish_update(b"u%d" % i)
        updates = agg.updates()
        first, _ = await anext(updates), await anext(updates)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(anext(updates), 0.05)
        await first.ack()
        assert (await asyncio.wait_for(anext(updates), 1)).body == b"u2"


async def test_updates_queue_is_bounded(job: str) -> None:
    embedded_broker("small", max_queued_updates=2)
    config = TransportConfig(url="memory://small", job=job)
    async with EmbeddedParticipant(config, "p1") as part:
        await part.publish_update(b"u0")
        await part.publish_update(b"u1")
        blocked = asyncio.create_task(part.publish_update(b"u2"), name="blocked-publish")
        await asyncio.sleep(0.01)
        assert not blocked.done()  # waits for room rather than growing without bound
        async with EmbeddedAggregator(config) as agg:
            delivery = await anext(agg.updates())
            await delivery.ack()
            await asyncio.wait_for(blocked, 1)
    assert embedded_broker("small").queued_updates(job) == 2


async def test_payload_too_large_is_refused_before_sending(config: TransportConfig) -> None:
    async with EmbeddedAggregator(config) as agg, EmbeddedParticipant(config, "p1") as part:
        await part.publish_update(b"x" * LIMIT)  # exactly the limit is fine
        with pytest.raises(PayloadTooLarge):
            await part.publish_update(b"x" * (LIMIT + 1))
        with pytest.raises(PayloadTooLarge):
            await agg.publish_model(b"x" * (LIMIT + 1), version=1)
        assert embedded_broker("unit").queued_updates(config.job) == 1
        assert embedded_broker("unit").latest_model(config.job) is None


async def test_reject_is_visible_to_operators(config: TransportConfig) -> None:
    async with EmbeddedAggregator(config) as agg, EmbeddedParticipant(config, "p7") as part:
        await part.publish_update(b"stale")
        delivery = await anext(agg.updates())
        await delivery.reject(RejectedUpdate(Reason.TOO_STALE, "base 1, model 9"))
    [record] = embedded_broker("unit").rejected(config.job)
    assert (record.reason, record.detail) == ("too_stale", "base 1, model 9")
    assert (record.participant, record.body) == ("p7", b"stale")
    assert embedded_broker("unit").queued_updates(config.job) == 0


async def test_rejection_records_keep_a_bounded_excerpt(config: TransportConfig) -> None:
    """Before: each record kept the whole body, so 1000 records could hold 1000 x the
    message limit. Now at most REJECTED_BODY_MAX bytes each."""
    body = bytes(range(256)) * (2 * REJECTED_BODY_MAX // 256)
    config = dataclasses.replace(config, max_message_bytes=len(body))
    async with EmbeddedAggregator(config) as agg, EmbeddedParticipant(config, "p7") as part:
        await part.publish_update(body)
        delivery = await anext(agg.updates())
        await delivery.reject(RejectedUpdate(Reason.NORM_BOUND, "too big a step"))
    [record] = embedded_broker("unit").rejected(config.job)
    assert (record.body, record.original_size) == (body[:REJECTED_BODY_MAX], len(body))


async def test_iterators_end_when_the_transport_closes(config: TransportConfig) -> None:
    agg = EmbeddedAggregator(config)
    part = EmbeddedParticipant(config, "p1")
    async with agg, part:
        updates = asyncio.create_task(anext(agg.updates()), name="updates")
        models = asyncio.create_task(anext(part.models()), name="models")
        await asyncio.sleep(0)
    with pytest.raises(StopAsyncIteration):
        await updates
    with pytest.raises(StopAsyncIteration):
        await models


async def test_closed_transport_cannot_be_reopened(config: TransportConfig) -> None:
    part = EmbeddedParticipant(config, "p1")
    with pytest.raises(ClosedResourceError):
        await part.publish_update(b"early")  # not open yet
    async with part:
        with pytest.raises(ClosedResourceError):
            await part.__aenter__()  # not reentrant
    with pytest.raises(ClosedResourceError):
        await part.__aenter__()
    with pytest.raises(ClosedResourceError):
        part.models()
    assert not part.connected


def test_bad_names_are_config_errors(job: str) -> None:
    with pytest.raises(ConfigError):
        EmbeddedParticipant(TransportConfig(url="memory://x", job=job), "a/b")
    with pytest.raises(ConfigError):
        EmbeddedAggregator(TransportConfig(url="amqp://h", job=job))


async def test_brokers_are_separate_per_name(job: str) -> None:
    one = TransportConfig(url="memory://one", job=job)
    two = TransportConfig(url="memory://two", job=job)
    async with EmbeddedAggregator(one) as agg:
        await agg.publish_model(b"m", version=1)
    async with EmbeddedParticipant(two, "p") as part:
        with pytest.raises(TimeoutError):
            await _next(part.models(), 0.05)


# -- shared by every transport ----------------------------------------------


def test_backoff_is_capped_exponential_with_full_jitter() -> None:
    backoff = Backoff(initial_s=0.5, max_s=4.0, rng=random.Random(1))
    caps = []
    for _ in range(6):
        caps.append(backoff.cap())
        assert 0.0 <= backoff.next_delay() <= caps[-1]
    assert caps == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    backoff.reset()
    assert backoff.cap() == 0.5
    assert backoff.attempt == 0


def test_backoff_jitter_spreads_delays() -> None:
    backoff = Backoff(initial_s=1.0, max_s=1.0, rng=random.Random(7))
    delays = {round(backoff.next_delay(), 3) for _ in range(20)}
    assert len(delays) > 10  # not one synchronized retry instant for the whole fleet


def test_backoff_rejects_bad_bounds() -> None:
    with pytest.raises(ConfigError):
        Backoff(initial_s=2.0, max_s=1.0)


def test_redact_url_hides_the_password() -> None:
    assert redact_url("amqp://u:secret@h:5672/v") == "amqp://u:***@h:5672/v"
    assert redact_url("mqtt://h:1883") == "mqtt://h:1883"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("amqp://u:pa#ss@h/", "amqp://u:***@h/"),  # a URL parser saw "ss@h/" as the fragment
        ("amqp://u:pa/ss@h:5672/", "amqp://u:***@h:5672/"),  # ... or "/ss@h:5672/" as a path
        ("amqp://u:p@h:bad/", "amqp://u:***@h:bad/"),  # a bad port does not raise
        ("mqtt://u:p@h:1883/?x=a@b", "mqtt://u:***@b"),  # an odd URL loses more, never less
        ("mqtt://u@h:1883", "mqtt://u@h:1883"),
        ("memory://demo", "memory://demo"),
    ],
)
def test_redact_url_hides_any_password(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_a_refused_url_is_named_without_its_password() -> None:
    with pytest.raises(ConfigError) as refused:
        TransportConfig(url="amqps+bad://u:hunter2@h/")
    assert "hunter2" not in str(refused.value)
    assert "u:***@h/" in str(refused.value)


# -- evaluation reports -------------------------------------------------------------------


async def test_a_report_reaches_the_aggregator_with_its_sender(config: TransportConfig) -> None:
    async with EmbeddedAggregator(config) as agg, EmbeddedParticipant(config, "p1") as part:
        await part.publish_eval(b"report")
        report = await asyncio.wait_for(anext(agg.evals()), 1)
    assert report == EvalReport(body=b"report", participant_hint="p1")


async def test_updates_and_reports_do_not_mix(config: TransportConfig) -> None:
    async with EmbeddedAggregator(config) as agg, EmbeddedParticipant(config, "p1") as part:
        await part.publish_update(b"update")
        await part.publish_eval(b"report")
        delivery = await asyncio.wait_for(anext(agg.updates()), 1)
        assert delivery.body == b"update"
        await delivery.ack()
        assert (await asyncio.wait_for(anext(agg.evals()), 1)).body == b"report"
        for iterator in (agg.updates(), agg.evals()):
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(anext(iterator), 0.05)


async def test_a_report_over_the_eval_limit_is_refused(config: TransportConfig) -> None:
    # The eval limit, not max_message_bytes (LIMIT here, far lower), bounds a report.
    async with EmbeddedAggregator(config) as agg, EmbeddedParticipant(config, "p1") as part:
        with pytest.raises(PayloadTooLarge, match="EVAL_LIMITS"):
            await part.publish_eval(bytes(EVAL_LIMITS.max_message_bytes + 1))
        await part.publish_eval(bytes(EVAL_LIMITS.max_message_bytes))
        assert len((await asyncio.wait_for(anext(agg.evals()), 1)).body) > LIMIT


async def test_reports_wait_for_the_aggregator_newest_kept(config: TransportConfig) -> None:
    async with EmbeddedParticipant(config, "p1") as part:
        for i in range(10_001):  # one more than the bound: the oldest goes, nobody waits
            await part.publish_eval(str(i).encode())
    async with EmbeddedAggregator(config) as agg:
        reports = agg.evals()
        assert (await asyncio.wait_for(anext(reports), 1)).body == b"1"
    async with EmbeddedAggregator(config) as agg:
        # Taken as handed over: a new aggregator gets the rest, not the first again.
        assert (await asyncio.wait_for(anext(agg.evals()), 1)).body == b"2"


async def test_evals_iterator_ends_when_the_aggregator_closes(config: TransportConfig) -> None:
    async with EmbeddedAggregator(config) as agg:
        pending = asyncio.ensure_future(anext(agg.evals()))
        await asyncio.sleep(0)
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(pending, 1)


def test_a_received_report_over_the_eval_limit_is_not_held() -> None:
    """What the AMQP and MQTT aggregators hand over for a report larger than any legal one."""
    refused = EvalReport.received(bytes(EVAL_LIMITS.max_message_bytes + 1), "dev-01")
    assert refused.body == b""
    assert refused.participant_hint == "dev-01"
    assert refused.refused is not None and refused.refused.reason is Reason.TOO_LARGE
    kept = EvalReport.received(b"report", "dev-01")
    assert kept == EvalReport(body=b"report", participant_hint="dev-01")
