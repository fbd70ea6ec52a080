"""Operator commands: ``fedmq ctl`` (live tuning) and ``fedmq keys`` (signing keys).

    fedmq ctl set --broker URL --job J [--signing-key operator.key] alpha=0.4 max_staleness=10
    fedmq ctl reset --broker URL --job J
    fedmq ctl forget-device --broker URL --job J dev-01
    fedmq keys create --id dev-01 --out DIR
    fedmq keys register --id dev-01 --pub DIR/dev-01.pub --keys-dir REGISTRY
    fedmq keys list --keys-dir REGISTRY

The CLI reads the configuration and calls these; they print what they did.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from fedmq.errors import ConfigError
from fedmq.strategies import parse_assignments
from fedmq.transport import TransportConfig, send_control
from fedmq.wire import (
    ControlCommand,
    ControlEnvelope,
    ControlValue,
    KeyRing,
    Signer,
    create_key_pair,
    encode_control,
    fingerprint,
    key_owner,
    load_public_key,
    register_public_key,
    seal,
)

__all__ = ["ctl", "keys"]


async def ctl(
    transport: TransportConfig,
    action: str,
    assignments: Sequence[str],
    signer: Signer | None = None,
) -> int:
    """Send ``set NAME=VALUE...``, ``reset`` or ``forget-device ID`` to the job's aggregator,
    signed by ``signer`` (an operator key) if given; 0 once the broker has it."""
    values: dict[str, ControlValue]
    command: ControlCommand
    if action == "set":
        command, values = "set", parse_assignments(assignments)
    elif action == "reset":
        if assignments:
            raise ConfigError("ctl reset: takes no NAME=VALUE")
        command, values = "reset", {}
    elif action == "forget-device":
        if len(assignments) != 1:
            raise ConfigError("ctl forget-device: takes one participant id")
        command, values = "forget", {"participant": assignments[0]}
    else:
        raise ConfigError(f"ctl: unknown action {action!r}; use set, reset or forget-device")
    envelope = ControlEnvelope(
        id=uuid.uuid4().hex[:12], command=command, values=values, issued=time.time()
    )
    try:
        body = encode_control(envelope)
    except ValueError as error:
        raise ConfigError(f"ctl {action}: {error}") from None
    await send_control(transport, seal(body, signer))
    shown = "".join(f" {k}={v}" for k, v in values.items())
    signed = f", signed by {signer.key_id}" if signer is not None else ", unsigned"
    print(
        f"sent {action}{shown} to job {transport.job} (id {envelope.id}{signed}); the "
        "aggregator logs 'tuned', 'forgot' or 'control_rejected' with this id, and counts "
        "fedmq_control_commands_total{result=...}"
    )
    return 0


def keys(
    action: str, *, key_id: str | None, out: str | None, pub: str | None, keys_dir: str | None
) -> int:
    """``create``, ``register`` or ``list`` keys; see the module docstring."""
    if action == "create":
        if not key_id or not out:
            raise ConfigError("keys create: needs --id and --out")
        private, public = create_key_pair(key_id, Path(out))
        print(f"created {private} (private, mode 0600: keep it on the device)")
        print(f"        {public} ({fingerprint(load_public_key(public))})")
        return 0
    if action == "register":
        if not key_id or not pub or not keys_dir:
            raise ConfigError("keys register: needs --id, --pub and --keys-dir")
        target, replaced = register_public_key(key_id, Path(pub), Path(keys_dir))
        new = fingerprint(load_public_key(target))
        note = f", replacing {replaced}" if replaced and replaced != new else ""
        print(f"registered {key_id} (owner {key_owner(key_id)}, {new}) as {target}{note}")
        return 0
    if action == "list":
        if not keys_dir:
            raise ConfigError("keys list: needs --keys-dir")
        ring = KeyRing(Path(keys_dir))
        for name in ring:
            key = ring.get(name)
            if key is not None:
                print(f"{name:<32} owner {key_owner(name):<24} {fingerprint(key)}")
        return 0
    raise ConfigError(f"keys: unknown action {action!r}; use create, register or list")
