"""examples/sensors/task.py, loaded as a user's ``--task`` is: by path, from the repo root.

Its data here is a small synthetic station file of the same columns (the real ones are
read by tests/integration/test_own_task.py).
"""

from __future__ import annotations

import gzip
import math
from pathlib import Path

import pytest

from fedmq.cli import task_of_data
from fedmq.errors import ConfigError
from fedmq.models import get_params, set_params
from fedmq.tasks import Task, TaskError, load_task

REPO = Path(__file__).resolve().parents[2]
SPEC = "examples/sensors/task.py:task"
HEADER = '"No","year","month","day","hour","PM2.5","PM10","SO2","NO2","CO","O3","TEMP","PRES","DEWP","RAIN","wd","WSPM","station"'  # noqa: E501
HOURS = 400


@pytest.fixture
def task(monkeypatch: pytest.MonkeyPatch) -> Task:
    monkeypatch.chdir(REPO)  # the spec is relative, as docs/tasks.md has the user type it
    return load_task(SPEC)


@pytest.fixture
def station_file(tmp_path: Path) -> Path:
    """``HOURS`` hours of a daily temperature cycle, gzipped; hour 100's TEMP is missing."""
    rows = [HEADER]
    for i in range(HOURS):
        day, hour = divmod(i, 24)
        temp = "NA" if i == 100 else f"{10 + 8 * math.sin(2 * math.pi * hour / 24):.1f}"
        rows.append(
            f'{i + 1},2016,1,{day + 1},{hour},20,30,5,40,800,30,{temp},1020,-5,0,"N",2.0,"Test"'
        )
    path = tmp_path / "PRSA_Data_Test_20160101-20160117.csv.gz"
    path.write_bytes(gzip.compress("\n".join(rows).encode()))
    return path


def test_the_example_loads_by_path_and_reads_its_own_file(task: Task, station_file: Path) -> None:
    assert task.name == "sensors" and task.train is not None
    assert task.target.name == "rmse" and task.target.better(1.0, 2.0)
    data = task_of_data(task, station_file)
    # 80% / 20% by time; windows of 12 hours touching the missing hour are left out.
    assert 0 < len(data.held_out) < len(data.train) < int(HOURS * 0.8) - 12  # type: ignore[arg-type]
    model = task.build_model(seed=0)
    before = task.score(model, data.held_out)
    loss = task.train_model(model, data.train, seed=0)
    assert math.isfinite(loss)
    after = task.score(model, data.held_out)
    assert set(after) == {"rmse", "mae"} and after["rmse"] < before["rmse"]


def test_batchnorms_counter_stays_on_the_device(task: Task, station_file: Path) -> None:
    model = task.build_model(seed=0)
    counters = [name for name in model.state_dict() if name.endswith("num_batches_tracked")]
    assert counters, "the example's model has BatchNorm"
    params = get_params(model)
    assert not set(counters) & set(params)
    assert any(name.endswith("running_mean") for name in params)  # float stats are averaged
    task.train_model(model, task_of_data(task, station_file).train, seed=0)
    trained = {name: int(model.state_dict()[name]) for name in counters}
    set_params(model, get_params(task.build_model(seed=1)))  # a global model arrives
    assert {name: int(model.state_dict()[name]) for name in counters} == trained


def test_what_a_user_mistypes_is_one_line(
    task: Task, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPO)
    with pytest.raises(TaskError, match="has no attribute 'tsak'"):
        load_task("examples/sensors/task.py:tsak")
    with pytest.raises(ConfigError) as caught:
        task_of_data(task, tmp_path / "PRSA_Data_Nowhere.csv")
    message = str(caught.value)
    assert message.startswith("data: task 'sensors' cannot read") and "FileNotFoundError" in message
    assert "\n" not in message
