"""Brokers behind one interface: AMQP (aio-pika), MQTT (aiomqtt), and an embedded default."""

from fedmq.transport._base import (
    SENDER_IDENTITIES,
    AggregatorTransport,
    Delivery,
    EvalReport,
    ParticipantTransport,
    TransportConfig,
)
from fedmq.transport._factory import connect_aggregator, connect_participant, send_control

__all__ = [
    "SENDER_IDENTITIES",
    "AggregatorTransport",
    "Delivery",
    "EvalReport",
    "ParticipantTransport",
    "TransportConfig",
    "connect_aggregator",
    "connect_participant",
    "send_control",
]
