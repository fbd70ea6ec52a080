"""Fixtures shared by the integration tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.integration.brokers import delete_job_queues, forget_mqtt_job


@pytest.fixture(
    params=[
        pytest.param("amqp", marks=pytest.mark.amqp),
        pytest.param("mqtt", marks=pytest.mark.mqtt),
    ]
)
async def broker(request: pytest.FixtureRequest, job: str) -> AsyncIterator[str]:
    """The URL of the real broker of this parameter; what the test left there is removed."""
    url = str(request.getfixturevalue(f"{request.param}_url"))
    yield url
    if request.param == "amqp":
        await delete_job_queues(url, job)
    else:
        await forget_mqtt_job(url, job, ["dev-01"])
