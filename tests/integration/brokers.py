"""Throwaway RabbitMQ and Mosquitto processes, started from broker_config/ beside the system ones.

The committed broker configs name paths inside the containers (``/etc/rabbitmq/...``,
``/mosquitto/...``) and the containers' ports. ``render_rabbitmq_conf`` and
``render_mosquitto_conf`` take a file's actual text and change only those: each path
prefix and each listener port is replaced where it occurs, and a missing one is an error,
so a renamed setting fails the test instead of silently testing something else. The
only lines added bind the HTTP listeners to the loopback interface.

Everything a broker writes (data, logs, its Erlang cookie and epmd) lives in a folder the
caller gives. The processes run in their own session and ``stop()`` kills that whole
process group: the system RabbitMQ (127.0.0.1:5672, epmd on 4369) and Mosquitto
(127.0.0.1:1883) are never touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import aiomqtt

from fedmq.transport.amqp import amqp_names
from fedmq.transport.mqtt import mqtt_topics

__all__ = [
    "BROKER_CONFIG",
    "REPO",
    "BrokerStartError",
    "Certs",
    "MosquittoProcess",
    "RabbitNode",
    "TcpProxy",
    "free_port",
    "make_certs",
    "read_demo_passwords",
    "render_mosquitto_conf",
    "render_rabbitmq_conf",
    "via_proxy",
    "world_readable_tmpdir",
]

REPO = Path(__file__).resolve().parents[2]
BROKER_CONFIG = REPO / "broker_config"
DEMO_SECRETS = REPO / "docker" / "demo-secrets"
# The real start script: /usr/sbin/rabbitmq-server is Debian's wrapper that su's to rabbitmq.
RABBITMQ_SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
EPMD = shutil.which("epmd") or "/usr/bin/epmd"


class BrokerStartError(RuntimeError):
    """A broker did not come up; the message ends with the tail of its log."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def read_demo_passwords() -> dict[str, str]:
    """The compose demo's credentials, ``user -> password``, from docker/demo-secrets/."""
    passwords: dict[str, str] = {}
    for path in sorted(DEMO_SECRETS.iterdir()):
        for line in path.read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                user, password = line.split(":", 1)
                passwords[user] = password
    return passwords


@dataclass(frozen=True, kw_only=True)
class Certs:
    """The files scripts/make-certs.sh writes into ``folder``."""

    folder: Path

    @property
    def ca(self) -> Path:
        return self.folder / "ca.pem"

    @property
    def server_cert(self) -> Path:
        return self.folder / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.folder / "server.key"

    def client(self, name: str) -> tuple[Path, Path]:
        """(certificate, key) of client ``name``."""
        return self.folder / f"client-{name}.pem", self.folder / f"client-{name}.key"


def make_certs(folder: Path, *, key_mode: str = "0600") -> Certs:
    """Run scripts/make-certs.sh into ``folder`` (a CA, the server and the default clients).

    Mosquitto drops root privileges to its own user before it reads the server key, as it
    does in its container: pass ``key_mode="0644"`` for throwaway test keys it must read.
    """
    subprocess.run(
        ["bash", str(REPO / "scripts" / "make-certs.sh"), str(folder)],
        check=True,
        capture_output=True,
        timeout=60,
        env={**os.environ, "FEDMQ_KEY_MODE": key_mode},
    )
    return Certs(folder=folder)


def world_readable_tmpdir(prefix: str) -> Path:
    """A new folder under the system temp dir that a broker's own user can traverse.

    pytest's tmp_path lives under a 0700 folder of the user running the tests, which the
    ``mosquitto`` user (that Mosquitto switches to when started as root) cannot enter.
    The caller removes it.
    """
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    folder.chmod(0o755)
    return folder


def _settings(text: str) -> list[str]:
    """The lines of a config file that are not comments."""
    return [line for line in text.splitlines() if not line.lstrip().startswith("#")]


def _replace_paths(text: str, paths: Mapping[str, str]) -> str:
    for old, new in paths.items():
        if old not in text:
            raise ValueError(f"config does not mention {old!r}: update the test's substitutions")
        text = text.replace(old, new)
    return text


def _replace_values(text: str, values: Mapping[str, str], *, separator: str) -> str:
    """Replace the whole value of each ``key<separator>value`` line named in ``values``."""
    for key, value in values.items():
        pattern = re.compile(rf"^({re.escape(key)}{separator})\S.*$", re.MULTILINE)
        text, count = pattern.subn(r"\g<1>" + value.replace("\\", "\\\\"), text)
        if count != 1:
            raise ValueError(f"config sets {key!r} {count} times, expected once")
    return text


def render_rabbitmq_conf(
    text: str, *, ports: Mapping[str, int], certs: Certs, definitions: Path
) -> str:
    """broker_config/rabbitmq.conf with container paths and ports replaced for a local node.

    ``ports`` keys: amqp, amqps, mqtt, mqtts, management, prometheus.
    """
    text = _replace_paths(
        text,
        {
            "/etc/rabbitmq/certs/": f"{certs.folder}/",
            "/etc/rabbitmq/definitions.json": str(definitions),
        },
    )
    text = _replace_values(
        text,
        {
            "listeners.tcp.default": f"127.0.0.1:{ports['amqp']}",
            "listeners.ssl.default": f"127.0.0.1:{ports['amqps']}",
            "mqtt.listeners.tcp.default": f"127.0.0.1:{ports['mqtt']}",
            "mqtt.listeners.ssl.default": f"127.0.0.1:{ports['mqtts']}",
            "management.tcp.port": str(ports["management"]),
            "prometheus.tcp.port": str(ports["prometheus"]),
        },
        separator=" = ",
    )
    if any(re.search(r"\s/etc/rabbitmq", line) for line in _settings(text)):
        raise ValueError("rabbitmq.conf names a container path the test does not substitute")
    return (
        text
        + "\n## added by tests/integration/brokers.py\nmanagement.tcp.ip = 127.0.0.1\n"
        + ("prometheus.tcp.ip = 127.0.0.1\n")
    )


def render_mosquitto_conf(
    text: str, *, ports: Mapping[int, int], certs: Certs, config_dir: Path, data_dir: Path
) -> str:
    """broker_config/mosquitto.conf with container paths replaced and listeners moved.

    ``ports`` maps each port the file listens on to the local port to use instead;
    the local listeners bind to 127.0.0.1 only.
    """
    text = _replace_paths(
        text,
        {
            "/mosquitto/certs/": f"{certs.folder}/",
            "/mosquitto/config/": f"{config_dir}/",
            "/mosquitto/data/": f"{data_dir}/",
        },
    )
    for container_port, local_port in ports.items():
        pattern = re.compile(rf"^listener {container_port}$", re.MULTILINE)
        text, count = pattern.subn(f"listener {local_port} 127.0.0.1", text)
        if count != 1:
            raise ValueError(f"mosquitto.conf has {count} 'listener {container_port}' lines")
    if re.search(r"^listener \d+$", text, re.MULTILINE) or any(
        re.search(r"\s/mosquitto/", line) for line in _settings(text)
    ):
        raise ValueError("mosquitto.conf has a listener or path the test does not substitute")
    return text


def _log_tail(path: Path, lines: int = 25) -> str:
    """The first error lines of a broker log (the cause), then its last ``lines``."""
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    errors = [line for line in text if "error" in line.lower()][:10]
    return "\n".join([*errors, "...", *text[-lines:]])


def _stop_group(proc: subprocess.Popen[bytes], *, grace_s: float) -> None:
    """SIGTERM the process group of ``proc``, SIGKILL it after ``grace_s``; reap ``proc``."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace_s)
    # Children (beam.smp, erl_child_setup) may outlive the shell that started them.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


class RabbitNode:
    """A second RabbitMQ node with its own name, ports, epmd, cookie, data and logs.

    ``conf_text`` is the rendered rabbitmq.conf; ``ports`` must hold the AMQP and MQTT
    ports it names (amqp, amqps, mqtt, mqtts, management, prometheus).
    """

    def __init__(
        self,
        folder: Path,
        *,
        conf_text: str,
        enabled_plugins: Path,
        ports: Mapping[str, int],
    ) -> None:
        self.folder = folder
        self.ports = dict(ports)
        self.log = folder / "rabbitmq-stdout.log"
        self.nodename = f"fedmqtest{os.getpid()}@localhost"
        self._conf_text = conf_text
        self._enabled_plugins = enabled_plugins
        self._epmd_port = free_port()
        self._dist_port = free_port()
        self._procs: list[subprocess.Popen[bytes]] = []

    @classmethod
    def from_repo_config(cls, folder: Path, *, certs: Certs) -> RabbitNode:
        """A node running broker_config/rabbitmq.conf, enabled_plugins and definitions.json."""
        ports = {
            name: free_port()
            for name in ("amqp", "amqps", "mqtt", "mqtts", "management", "prometheus")
        }
        conf = render_rabbitmq_conf(
            (BROKER_CONFIG / "rabbitmq.conf").read_text(),
            ports=ports,
            certs=certs,
            definitions=BROKER_CONFIG / "definitions.json",
        )
        return cls(
            folder, conf_text=conf, enabled_plugins=BROKER_CONFIG / "enabled_plugins", ports=ports
        )

    def start(self) -> None:
        """Start epmd and the node; return at once (see ``wait_listening``)."""
        if not RABBITMQ_SERVER.exists():
            raise FileNotFoundError(RABBITMQ_SERVER)
        home = self.folder / "home"
        home.mkdir(parents=True, exist_ok=True)
        cookie = home / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(16).upper())
        cookie.chmod(0o400)
        (self.folder / "rabbitmq.conf").write_text(self._conf_text)
        # A copy, because rabbitmq-plugins would rewrite the file it is given.
        shutil.copy(self._enabled_plugins, self.folder / "enabled_plugins")
        (self.folder / "rabbitmq-env.conf").write_text("")  # not /etc/rabbitmq's NODENAME
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LANG": "C.UTF-8",
            "HOME": str(home),
            "ERL_EPMD_PORT": str(self._epmd_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODENAME": self.nodename,
            "RABBITMQ_NODE_PORT": str(self.ports["amqp"]),
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_DIST_PORT": str(self._dist_port),
            "RABBITMQ_CONF_ENV_FILE": str(self.folder / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(self.folder / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.folder / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.folder / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(self.folder / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.folder / "log"),
            # Our own epmd (below) instead of the system one; distribution on loopback.
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": (
                "-start_epmd false -kernel inet_dist_use_interface {127,0,0,1}"
            ),
        }
        with self.log.open("wb") as out:
            self._procs.append(
                subprocess.Popen(
                    [EPMD, "-port", str(self._epmd_port), "-address", "127.0.0.1"],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
            deadline = time.monotonic() + 5
            while not _port_open(self._epmd_port):
                if time.monotonic() > deadline:
                    raise BrokerStartError(f"epmd did not listen on {self._epmd_port}")
                time.sleep(0.05)
            self._procs.append(
                subprocess.Popen(
                    [str(RABBITMQ_SERVER)],
                    env=env,
                    cwd=self.folder,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )

    def wait_listening(self, timeout_s: float) -> None:
        """Block until every listener accepts TCP connections (boot finished)."""
        deadline = time.monotonic() + timeout_s
        waiting = set(self.ports)
        while waiting:
            node = self._procs[-1]
            if node.poll() is not None:
                raise BrokerStartError(
                    f"RabbitMQ exited with {node.returncode}:\n{_log_tail(self.log)}"
                )
            waiting = {name for name in waiting if not _port_open(self.ports[name])}
            if waiting and time.monotonic() > deadline:
                raise BrokerStartError(
                    f"RabbitMQ listeners {sorted(waiting)} not up after {timeout_s}s:\n"
                    + _log_tail(self.log)
                )
            time.sleep(0.2)

    def stop(self) -> None:
        """Kill the node and its epmd (process groups of our own children only)."""
        for proc in reversed(self._procs):
            _stop_group(proc, grace_s=1)
        self._procs.clear()


class MosquittoProcess:
    """A second Mosquitto started with a rendered mosquitto.conf."""

    def __init__(self, folder: Path, *, conf_text: str, ports: Mapping[str, int]) -> None:
        self.folder = folder
        self.ports = dict(ports)
        self.log = folder / "mosquitto.log"
        self._conf_text = conf_text
        self._proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def from_repo_config(cls, folder: Path, *, certs: Certs) -> MosquittoProcess:
        """A Mosquitto running broker_config/mosquitto.conf with its password and ACL files.

        ``folder`` must be traversable by the ``mosquitto`` user (``world_readable_tmpdir``).
        The password and ACL files are copied there unchanged, so that user can read them
        wherever the repository is checked out.
        """
        config_dir = folder / "config"
        data_dir = folder / "data"
        config_dir.mkdir()
        data_dir.mkdir()
        for name in ("mosquitto.passwd", "mosquitto.acl"):
            shutil.copy(BROKER_CONFIG / name, config_dir / name)
        # No such user, or not root: then Mosquitto keeps running as the caller anyway.
        with contextlib.suppress(LookupError, PermissionError):
            shutil.chown(data_dir, user="mosquitto", group="mosquitto")
        ports = {1883: free_port(), 8883: free_port()}
        conf = render_mosquitto_conf(
            (BROKER_CONFIG / "mosquitto.conf").read_text(),
            ports=ports,
            certs=certs,
            config_dir=config_dir,
            data_dir=data_dir,
        )
        return cls(folder, conf_text=conf, ports={"mqtt": ports[1883], "mqtts": ports[8883]})

    def start(self) -> None:
        if not Path(MOSQUITTO).exists():
            raise FileNotFoundError(MOSQUITTO)
        conf = self.folder / "mosquitto.conf"
        conf.write_text(self._conf_text)
        with self.log.open("wb") as out:
            self._proc = subprocess.Popen(
                [MOSQUITTO, "-c", str(conf)],
                cwd=self.folder,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_listening(self, timeout_s: float) -> None:
        assert self._proc is not None, "start() first"
        deadline = time.monotonic() + timeout_s
        while not all(_port_open(port) for port in self.ports.values()):
            if self._proc.poll() is not None:
                raise BrokerStartError(
                    f"Mosquitto exited with {self._proc.returncode}:\n{_log_tail(self.log)}"
                )
            if time.monotonic() > deadline:
                raise BrokerStartError(
                    f"Mosquitto not listening after {timeout_s}s:\n{_log_tail(self.log)}"
                )
            time.sleep(0.05)

    def stop(self) -> None:
        if self._proc is not None:
            _stop_group(self._proc, grace_s=5)
            self._proc = None


async def delete_job_queues(url: str, job: str) -> None:
    """Delete a job's RabbitMQ queues (updates, rejected, models, control, evals) and its
    uplink exchange, if they exist."""
    names = amqp_names(job)
    async with await aio_pika.connect(url) as connection:
        for name in (names.updates, names.rejected, names.models, names.control, names.evals):
            channel = await connection.channel()
            with contextlib.suppress(aio_pika.exceptions.ChannelClosed):
                await channel.queue_delete(name)
            if not channel.is_closed:
                await channel.close()
        channel = await connection.channel()
        with contextlib.suppress(aio_pika.exceptions.ChannelClosed):
            await channel.exchange_delete(names.uplink)
        if not channel.is_closed:
            await channel.close()


async def forget_mqtt_job(url: str, job: str, participants: Sequence[str]) -> None:
    """Drop a job's retained model and the persistent sessions its MQTT clients left."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 1883
    async with aiomqtt.Client(host, port) as client:
        await client.publish(mqtt_topics(job).model, b"", qos=1, retain=True)
    for suffix in ("aggregator", *(f"p-{pid}" for pid in participants)):
        async with aiomqtt.Client(host, port, identifier=f"fedmq-{job}-{suffix}"):
            pass  # clean_session defaults to True: the broker forgets the session


class TcpProxy:
    """Forwards 127.0.0.1:<port> to the broker; ``cut()`` kills the live connections."""

    def __init__(self, host: str, port: int) -> None:
        self._upstream = (host, port)
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        self.cut()
        await self._server.wait_closed()
        if self._tasks:
            await asyncio.wait(self._tasks)

    def cut(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.create_task(self._serve(reader, writer), name="proxy-connection")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._upstream)
        except OSError:
            writer.transport.abort()
            self._writers.discard(writer)
            return
        self._writers.add(up_writer)
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        finally:
            for w in (writer, up_writer):
                w.transport.abort()
                self._writers.discard(w)

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.transport.abort()


def via_proxy(url: str, port: int) -> str:
    """``url`` with its host and port replaced by the proxy's (credentials kept)."""
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)
    host = f"127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=f"{netloc[0]}@{host}" if len(netloc) == 2 else host))


async def next_within(iterator: AsyncIterator[Any], within: float = 5.0) -> Any:
    """The iterator's next item, or TimeoutError after ``within`` seconds."""
    return await asyncio.wait_for(anext(iterator), within)


async def nothing_within(iterator: AsyncIterator[Any], within: float) -> bool:
    """True if the iterator yields nothing for ``within`` seconds."""
    try:
        await asyncio.wait_for(anext(iterator), within)
    except TimeoutError:
        return True
    return False
