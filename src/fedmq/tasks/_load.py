"""``--task``: a task object from a file, a module or an installed plugin.

The three forms a user types, and the one-line error each gives when something is
missing (a ``TaskError`` naming what):

- ``my_sensors.py:task``: a Python file, imported by path (it need not be on sys.path);
- ``my_fleet.tasks:task``: an importable module and an attribute of it;
- ``my-fleet``: the name of an entry point in the group ``fedmq.tasks``, which a package
  declares (``[project.entry-points."fedmq.tasks"] my-fleet = "my_fleet.tasks:task"``);
  fedmq's built-in tasks are found the same way, first.

importlib does the importing; what is written here is only the spelling of the three
forms and the errors.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import sys
from collections.abc import Mapping
from pathlib import Path

from fedmq.errors import ConfigError
from fedmq.tasks._task import Task

__all__ = ["ENTRY_POINT_GROUP", "TaskError", "load_task"]

ENTRY_POINT_GROUP = "fedmq.tasks"


class TaskError(ConfigError):
    """A task that cannot be loaded; the message is one line naming what is missing."""


def load_task(spec: str, *, builtins: Mapping[str, str] | None = None) -> Task:
    """The ``Task`` that ``spec`` names (see the module docstring).

    ``builtins``: name -> ``module:attribute`` of the tasks fedmq ships, tried before
    the installed entry points.
    """
    if ":" in spec:
        where, _, attribute = spec.rpartition(":")
        if not where or not attribute:
            raise TaskError(f"task {spec!r}: expected FILE.py:OBJECT or MODULE:OBJECT")
        if where.endswith(".py") or "/" in where or Path(where).is_file():
            holder = _import_file(spec, Path(where))
        else:
            holder = _import_module(spec, where)
        return _task_of(spec, getattr(holder, attribute, _MISSING), attribute, where)
    if builtins and spec in builtins:
        return load_task(builtins[spec])
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if entry.name == spec:
            try:
                loaded = entry.load()
            except (ImportError, AttributeError) as error:
                raise TaskError(f"task {spec!r}: plugin {entry.value!r} fails: {error}") from error
            return _task_of(spec, loaded, entry.value, "the plugin")
    known = sorted(
        {
            *(builtins or {}),
            *(e.name for e in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)),
        }
    )
    raise TaskError(
        f"task {spec!r}: no built-in task or installed plugin of that name"
        f" (known: {', '.join(known) or 'none'}; or give FILE.py:OBJECT)"
    )


_MISSING = object()


def _import_file(spec: str, path: Path) -> object:
    if not path.is_file():
        raise TaskError(f"task {spec!r}: no file {str(path)!r}")
    name = f"fedmq_task_{abs(hash(path.resolve()))}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise TaskError(f"task {spec!r}: {str(path)!r} is not a Python file")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # dataclasses and pickling look a module up by name
    try:
        module_spec.loader.exec_module(module)
    except Exception as error:  # a user's file: any error is theirs to read, in one line
        del sys.modules[name]
        raise TaskError(f"task {spec!r}: importing {str(path)!r} failed: {error!r}") from error
    return module


def _import_module(spec: str, name: str) -> object:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        raise TaskError(f"task {spec!r}: no module named {error.name!r}") from error


def _task_of(spec: str, value: object, attribute: str, where: str) -> Task:
    if value is _MISSING:
        raise TaskError(f"task {spec!r}: {where!r} has no attribute {attribute!r}")
    if callable(value) and not isinstance(value, Task) and not isinstance(value, type):
        try:
            value = value()  # a factory of the task is fine too
        except Exception as error:  # a user's factory: its error, in one line
            raise TaskError(f"task {spec!r}: {attribute}() failed: {error!r}") from error
    if not isinstance(value, Task):
        raise TaskError(
            f"task {spec!r}: {attribute!r} is a {type(value).__name__}, not a fedmq.tasks.Task"
        )
    return value
