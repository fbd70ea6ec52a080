"""Shared fixtures: where the data is, and the real brokers.

Broker tests talk to the real RabbitMQ and Mosquitto. Outside CI an unreachable
broker skips them; with CI=true it fails them, so a green CI run always means
the broker tests really ran.
"""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest

REPO = Path(__file__).resolve().parent.parent
AMQP_URL = os.environ.get("FEDMQ_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
MQTT_URL = os.environ.get("FEDMQ_MQTT_URL", "mqtt://127.0.0.1:1883")


def _reachable(url: str) -> bool:
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or (5672 if parts.scheme.startswith("amqp") else 1883)
    try:
        with socket.create_connection((host, port), timeout=2.0):
            return True
    except OSError:
        return False


def _require(url: str) -> str:
    if _reachable(url):
        return url
    message = f"broker at {url} is unreachable"
    if os.environ.get("CI") == "true":
        pytest.fail(message + " (CI=true: broker tests must run)")
    pytest.skip(message)


@pytest.fixture
def amqp_url() -> str:
    """URL of the real RabbitMQ; fails under CI=true when it is down."""
    return _require(AMQP_URL)


@pytest.fixture
def mqtt_url() -> str:
    """URL of the real Mosquitto; fails under CI=true when it is down."""
    return _require(MQTT_URL)


@pytest.fixture
def job() -> str:
    """A job name of its own, so tests never see each other's queues and topics."""
    return f"t-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The folder holding fashion-mnist/: FEDMQ_DATA_DIR, else ../shared/data beside the repo."""
    path = Path(os.environ.get("FEDMQ_DATA_DIR", REPO.parent / "shared" / "data"))
    if not (path / "fashion-mnist").is_dir():
        pytest.fail(f"Fashion-MNIST not found under {path}; set FEDMQ_DATA_DIR")
    return path
