"""Chaos run of any length against a broker of its own; prints the reconciliation table.

    python benchmarks/chaos.py --transport amqp --minutes 5
    python benchmarks/chaos.py --transport mqtt --minutes 5 --devices 5 --seed 3 --keep

Kills the aggregator with SIGKILL (3 times by default) and restarts it on its checkpoint,
restarts the broker (once), kills and restarts devices (one per 30 s), then drains and
reconciles every published update with what was applied or refused. Exit status 0 when
nothing was lost, nothing applied twice, versions never went back and the final model
reached the target accuracy. The logic lives in tests/integration/chaos.py, which the
CI test (tests/integration/test_chaos.py) runs in a short form.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for tests/

from tests.integration.chaos import main

if __name__ == "__main__":
    sys.exit(main())
