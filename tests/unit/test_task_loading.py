"""``--task``: loading a task from a file, a module or a plugin name, and the one-line errors."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from fedmq.errors import ConfigError
from fedmq.tasks import DeviceData, Metric, Task, TaskError, load_task

TASK_FILE = textwrap.dedent(
    """
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset
    from fedmq.tasks import DeviceData, Metric, Task

    def data(path):
        x = torch.zeros(4, 3)
        return DeviceData(train=TensorDataset(x), held_out=TensorDataset(x))

    task = Task(
        name="sensors",
        model=lambda: nn.Linear(3, 1),
        load_data=data,
        evaluate=lambda model, dataset: {"rmse": 1.0},
        target=Metric("rmse", higher_is_better=False),
    )

    def make_task():
        return task

    not_a_task = 42
    """
)


@pytest.fixture
def task_file(tmp_path: Path) -> Path:
    path = tmp_path / "my_sensors.py"
    path.write_text(TASK_FILE)
    return path


def test_a_task_loads_from_a_file_by_path(task_file: Path) -> None:
    task = load_task(f"{task_file}:task")
    assert task.name == "sensors" and isinstance(task.model(), nn.Linear)
    assert task.target.better(0.5, 1.0)  # RMSE: lower is better
    assert load_task(f"{task_file}:make_task").name == "sensors"  # a factory too


def test_a_task_loads_from_a_module(task_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(task_file.parent))
    assert load_task("my_sensors:task").name == "sensors"


def test_a_builtin_name_resolves_to_its_module(task_file: Path) -> None:
    assert load_task("sensors", builtins={"sensors": f"{task_file}:task"}).name == "sensors"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("{dir}/missing.py:task", "no file"),
        ("{file}:nothing", "has no attribute 'nothing'"),
        ("{file}:not_a_task", "'not_a_task' is a int, not a fedmq.tasks.Task"),
        ("no_such_module_here:task", "no module named 'no_such_module_here'"),
        ("no-such-plugin", "no built-in task or installed plugin"),
        (":task", "expected FILE.py:OBJECT"),
    ],
)
def test_a_task_that_cannot_be_loaded_is_one_line_naming_what_is_missing(
    task_file: Path, spec: str, message: str
) -> None:
    with pytest.raises(TaskError) as caught:
        load_task(spec.format(dir=task_file.parent, file=task_file))
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_a_file_that_fails_to_import_says_so_in_one_line(tmp_path: Path) -> None:
    broken = tmp_path / "broken.py"
    broken.write_text("import no_such_package_anywhere\n")
    with pytest.raises(TaskError, match=r"importing .* failed: ModuleNotFoundError"):
        load_task(f"{broken}:task")


def test_a_task_needs_its_pieces() -> None:
    def data(path: Path) -> DeviceData:
        x = torch.zeros(1)
        return DeviceData(train=TensorDataset(x), held_out=TensorDataset(x))

    with pytest.raises(ConfigError, match=r"Task\.model: must be callable"):
        Task(
            name="x",
            model=None,  # type: ignore[arg-type]
            load_data=data,
            evaluate=lambda model, dataset: {},
            target=Metric("accuracy", higher_is_better=True),
        )


def test_a_metric_name_must_travel_in_an_eval_report() -> None:
    assert Metric("rmse", higher_is_better=False).name == "rmse"
    for bad in ("", "RMSE", "pm2.5"):
        with pytest.raises(ConfigError, match=r"Metric\.name"):
            Metric(bad, higher_is_better=False)
