"""The device runtime: receive the model, train locally, publish the delta."""

from fedmq.participant._config import ParticipantConfig
from fedmq.participant._outbox import Outbox
from fedmq.participant._runtime import Participant, ParticipantStats
from fedmq.participant._trainer import PrivacyBudgetSpent

__all__ = ["Outbox", "Participant", "ParticipantConfig", "ParticipantStats", "PrivacyBudgetSpent"]
