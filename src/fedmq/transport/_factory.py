"""Pick the transport implementation from the URL scheme."""

from __future__ import annotations

from fedmq.transport._base import AggregatorTransport, ParticipantTransport, TransportConfig


def connect_aggregator(config: TransportConfig) -> AggregatorTransport:
    """The aggregator's transport for ``config.url``; use it as ``async with``."""
    if config.scheme in ("amqp", "amqps"):
        from fedmq.transport.amqp import AmqpAggregator

        return AmqpAggregator(config)
    if config.scheme in ("mqtt", "mqtts"):
        from fedmq.transport.mqtt import MqttAggregator

        return MqttAggregator(config)
    from fedmq.transport.embedded import EmbeddedAggregator

    return EmbeddedAggregator(config)


def connect_participant(config: TransportConfig, participant_id: str) -> ParticipantTransport:
    """A participant's transport for ``config.url``; use it as ``async with``."""
    if config.scheme in ("amqp", "amqps"):
        from fedmq.transport.amqp import AmqpParticipant

        return AmqpParticipant(config, participant_id)
    if config.scheme in ("mqtt", "mqtts"):
        from fedmq.transport.mqtt import MqttParticipant

        return MqttParticipant(config, participant_id)
    from fedmq.transport.embedded import EmbeddedParticipant

    return EmbeddedParticipant(config, participant_id)


async def send_control(config: TransportConfig, body: bytes) -> None:
    """Send one operator command to the aggregator of ``config.job`` and return once the
    broker has it (no retries: ``BrokerUnavailable`` / ``TransportError`` say why not)."""
    if config.scheme in ("amqp", "amqps"):
        from fedmq.transport.amqp import publish_control
    elif config.scheme in ("mqtt", "mqtts"):
        from fedmq.transport.mqtt import publish_control
    else:
        from fedmq.transport.embedded import publish_control
    await publish_control(config, body)
