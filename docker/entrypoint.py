"""Container entrypoint: derive a replica's identity and broker URL, then exec ``fedmq``.

    fedmq-entrypoint aggregator [FLAGS...]   ->  fedmq aggregator [FLAGS...]
    fedmq-entrypoint participant [FLAGS...]  ->  fedmq participant [FLAGS...]

Only what is not already set is filled in (anything set explicitly wins):

FEDMQ_BROKER
    From FEDMQ_BROKER_TEMPLATE, e.g. ``amqps://{user}:{password}@rabbitmq:5671/fedmq``:
    ``{user}`` is FEDMQ_BROKER_USER, else FEDMQ_ID; ``{password}`` is that user's line
    ``user:password`` in FEDMQ_PASSWORD_FILE (a compose secret), URL-quoted.
FEDMQ_ID, FEDMQ_SHARD, FEDMQ_STATE_DIR (participants only)
    ``docker compose up --scale participant=N`` starts identical replicas named
    ``<project>-participant-<k>``, k = 1..N. The replica number k comes from
    FEDMQ_PARTICIPANT_INDEX, else from the container's own name: the PTR record of its
    address, asked of the DNS server in /etc/resolv.conf (Docker's embedded DNS answers
    ``<container-name>.<network>``; libc would read /etc/hosts, which names the id).
    Then FEDMQ_ID = FEDMQ_ID_PREFIX + k on two digits ("dev-01"), FEDMQ_SHARD =
    "k-1/FEDMQ_NUM_SHARDS" (shards count from 0), and FEDMQ_STATE_DIR =
    FEDMQ_STATE_ROOT/FEDMQ_ID, so replicas sharing one outbox volume never share a folder.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
import struct
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from urllib.parse import quote

__all__ = [
    "broker_url",
    "main",
    "parse_replica_number",
    "prepare_env",
    "ptr_answer",
    "ptr_query",
    "replica_number",
]

DEFAULT_STATE_ROOT = "/var/lib/fedmq/outboxes"


class EntrypointError(Exception):
    """The container is missing configuration; the message says what to set."""


def parse_replica_number(name: str) -> int | None:
    """``fedmq-participant-3.fedmq_default`` -> 3 (compose v2 and v1 names); else None."""
    match = re.fullmatch(r".+[-_](\d+)", name.split(".", 1)[0])
    return int(match.group(1)) if match else None


def ptr_query(address: str, query_id: int) -> bytes:
    """A DNS query (RFC 1035) for the PTR record of IPv4 ``address``."""
    labels = [*reversed(address.split(".")), "in-addr", "arpa"]
    name = b"".join(bytes([len(label)]) + label.encode() for label in labels) + b"\0"
    # header: id, flags (recursion desired), 1 question, no other records
    return struct.pack("!6H", query_id, 0x0100, 1, 0, 0, 0) + name + struct.pack("!2H", 12, 1)


def _read_name(message: bytes, offset: int) -> tuple[str, int]:
    """The domain name at ``offset`` (following compression pointers) and the offset after it."""
    labels: list[str] = []
    after: int | None = None
    for _ in range(128):  # a loop of pointers in a hostile answer ends here
        length = message[offset]
        if length & 0xC0 == 0xC0:
            after = offset + 2 if after is None else after
            offset = (length & 0x3F) << 8 | message[offset + 1]
        elif length == 0:
            return ".".join(labels), offset + 1 if after is None else after
        else:
            labels.append(message[offset + 1 : offset + 1 + length].decode("ascii"))
            offset += 1 + length
    raise ValueError("DNS name too long")


def ptr_answer(message: bytes, query_id: int) -> str:
    """The first PTR name in a DNS answer to the query ``query_id``."""
    answer_id, flags, questions, answers = struct.unpack("!4H", message[:8])
    if answer_id != query_id or flags & 0x000F:
        raise OSError(f"DNS answer id {answer_id}, rcode {flags & 0x000F}")
    offset = 12
    for _ in range(questions):
        offset = _read_name(message, offset)[1] + 4  # type, class
    for _ in range(answers):
        offset = _read_name(message, offset)[1]
        kind, _class, _ttl, length = struct.unpack("!2HIH", message[offset : offset + 10])
        offset += 10
        if kind == 12:
            return _read_name(message, offset)[0]
        offset += length
    raise OSError("no PTR record in the DNS answer")


def _reverse_dns_name(resolv_conf: str = "/etc/resolv.conf") -> str:
    # Asked of the DNS server itself: libc's reverse lookup reads /etc/hosts first, where
    # Docker maps this address to the container id, not its name.
    address = socket.gethostbyname(socket.gethostname())
    servers = [
        line.split()[1]
        for line in Path(resolv_conf).read_text().splitlines()
        if line.startswith("nameserver") and len(line.split()) > 1
    ]
    if not servers:
        raise OSError(f"no nameserver in {resolv_conf}")
    query_id = secrets.randbelow(1 << 16)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(3)
        sock.sendto(ptr_query(address, query_id), (servers[0], 53))
        message = sock.recv(4096)
    try:
        return ptr_answer(message, query_id)
    except (ValueError, IndexError, struct.error) as exc:
        raise OSError(f"unreadable DNS answer: {exc}") from exc


def replica_number(env: Mapping[str, str], lookup: Callable[[], str] = _reverse_dns_name) -> int:
    """This replica's number k >= 1: FEDMQ_PARTICIPANT_INDEX, else from the container name."""
    if "FEDMQ_PARTICIPANT_INDEX" in env:
        number = int(env["FEDMQ_PARTICIPANT_INDEX"])
    else:
        try:
            name = lookup()
        except OSError as exc:
            raise EntrypointError(
                f"cannot find this container's name by reverse DNS ({exc}); "
                "set FEDMQ_ID and FEDMQ_SHARD, or FEDMQ_PARTICIPANT_INDEX"
            ) from exc
        found = parse_replica_number(name)
        if found is None:
            raise EntrypointError(
                f"container name {name!r} does not end with a replica number; "
                "set FEDMQ_ID and FEDMQ_SHARD, or FEDMQ_PARTICIPANT_INDEX"
            )
        number = found
    if number < 1:
        raise EntrypointError(f"FEDMQ_PARTICIPANT_INDEX: {number} must be >= 1")
    return number


def _password(path: str, user: str) -> str:
    lines = [line.strip() for line in Path(path).read_text().splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    for line in lines:
        name, sep, password = line.partition(":")
        if sep and name == user:
            return password
    if len(lines) == 1 and ":" not in lines[0]:
        return lines[0]  # a file holding just one password
    raise EntrypointError(f"FEDMQ_PASSWORD_FILE {path} has no line for user {user!r}")


def broker_url(template: str, *, user: str, password: str) -> str:
    """Fill ``{user}`` and ``{password}`` in ``template``, URL-quoted."""
    return template.replace("{user}", quote(user, safe="")).replace(
        "{password}", quote(password, safe="")
    )


def prepare_env(
    role: str, env: Mapping[str, str], lookup: Callable[[], str] = _reverse_dns_name
) -> dict[str, str]:
    """The environment ``fedmq <role>`` runs with."""
    out = dict(env)
    if role == "participant":
        needs_number = "FEDMQ_ID" not in out or "FEDMQ_SHARD" not in out
        number = replica_number(out, lookup) if needs_number else 0
        if "FEDMQ_ID" not in out:
            out["FEDMQ_ID"] = f"{out.get('FEDMQ_ID_PREFIX', 'dev-')}{number:02d}"
        if "FEDMQ_SHARD" not in out:
            if "FEDMQ_NUM_SHARDS" not in out:
                raise EntrypointError("set FEDMQ_SHARD (I/N), or FEDMQ_NUM_SHARDS")
            shards = int(out["FEDMQ_NUM_SHARDS"])
            if not 1 <= number <= shards:
                raise EntrypointError(
                    f"replica {number} has no shard: FEDMQ_NUM_SHARDS is {shards}; "
                    "scale to at most FEDMQ_NUM_SHARDS replicas"
                )
            out["FEDMQ_SHARD"] = f"{number - 1}/{shards}"
        if "FEDMQ_STATE_DIR" not in out:
            root = out.get("FEDMQ_STATE_ROOT", DEFAULT_STATE_ROOT)
            out["FEDMQ_STATE_DIR"] = f"{root}/{out['FEDMQ_ID']}"
    if "FEDMQ_BROKER" not in out and "FEDMQ_BROKER_TEMPLATE" in out:
        user = out.get("FEDMQ_BROKER_USER") or out.get("FEDMQ_ID")
        if not user:
            raise EntrypointError("FEDMQ_BROKER_TEMPLATE needs FEDMQ_BROKER_USER or FEDMQ_ID")
        if "FEDMQ_PASSWORD_FILE" not in out:
            raise EntrypointError("FEDMQ_BROKER_TEMPLATE needs FEDMQ_PASSWORD_FILE")
        password = _password(out["FEDMQ_PASSWORD_FILE"], user)
        out["FEDMQ_BROKER"] = broker_url(out["FEDMQ_BROKER_TEMPLATE"], user=user, password=password)
    return out


def main(argv: list[str]) -> None:
    role = argv[1] if len(argv) > 1 else ""
    try:
        env = prepare_env(role, os.environ)
    except EntrypointError as exc:
        print(f"fedmq-entrypoint: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    if role == "participant":
        Path(env["FEDMQ_STATE_DIR"]).mkdir(parents=True, exist_ok=True)
        print(
            f"fedmq-entrypoint: participant {env['FEDMQ_ID']} shard {env['FEDMQ_SHARD']}",
            file=sys.stderr,
        )
    os.execvpe("fedmq", ["fedmq", *argv[1:]], env)


if __name__ == "__main__":
    main(sys.argv)
