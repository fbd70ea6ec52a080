"""A device whose model is not the aggregator's is told so in one line and exits.

Real ``fedmq aggregator`` and ``fedmq participant`` processes over RabbitMQ and Mosquitto:
the aggregator runs ``cnn-s``, the device ``mlp``. Before, the device logged
``model_rejected reason=tensor_mismatch`` for every model and waited forever; an update
of another model is refused by the aggregator with a counted reason.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fedmq.transport import TransportConfig, connect_participant
from tests.integration.fleet import FedmqProcess, wait_for
from tests.updates import delta, update

pytestmark = pytest.mark.timeout(240)


async def test_a_device_with_another_model_exits_with_one_line(
    broker: str,
    job: str,
    tmp_path: Path,
    data_dir: Path,
) -> None:
    common = ["--broker", broker, "--job", job]
    aggregator = FedmqProcess(
        "aggregator", ["aggregator", *common, "--eval-every", "0"], tmp_path, data_dir
    )
    procs = [aggregator]
    try:
        wait_for(lambda: aggregator.events("published"), 90, "the first model", procs)
        device = FedmqProcess(
            "dev-01",
            [
                "participant",
                *common,
                *("--id", "dev-01", "--model", "mlp", "--shard", "0/10"),
                *("--max-examples", "100", "--state-dir", str(tmp_path / "dev-01")),
            ],
            tmp_path,
            data_dir,
        )
        procs.append(device)
        device.popen.wait(120)
        assert device.popen.returncode == 2
        errors = [
            line for line in device.log_path.read_text().splitlines() if "fedmq: error" in line
        ]
        assert len(errors) == 1, device.tail()
        assert "the aggregator's model is not this device's" in errors[0]
        assert "conv1.weight only there" in errors[0] and "only here" in errors[0]
        # An update of another model is refused and counted.
        async with connect_participant(TransportConfig(url=broker, job=job), "dev-02") as dev:
            await dev.publish_update(update("dev-02", 0, 0, delta(1.0)))
        wait_for(lambda: aggregator.events("rejected"), 60, "the refusal", procs[:1])
        assert aggregator.events("rejected")[0]["reason"] == "tensor_mismatch"
    finally:
        for proc in procs:
            proc.stop()
