"""Operator commands: ``fedmq ctl`` (live tuning) and ``fedmq keys`` (signing keys).

    fedmq ctl set --broker URL --job J [--signing-key operator.key] alpha=0.4 max_staleness=10
    fedmq ctl reset --broker URL --job J
    fedmq ctl forget-device --broker URL --job J dev-01
    fedmq ctl status --metrics-url http://aggregator:9100/metrics
    fedmq keys create --id dev-01 --out DIR
    fedmq keys register --id dev-01 --pub DIR/dev-01.pub --keys-dir REGISTRY
    fedmq keys list --keys-dir REGISTRY

The CLI reads the configuration and calls these; they print what they did.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Sequence
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from fedmq.errors import ConfigError
from fedmq.strategies import parse_assignments
from fedmq.transport import TransportConfig, send_control
from fedmq.transport._common import redact_url
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

__all__ = ["ctl", "keys", "status"]


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


# What ``status`` shows first, in this order: the model, what came in, privacy. Every other
# fedmq_* gauge and counter follows (histograms are left to Prometheus).
_HEADLINE = (
    "fedmq_model_version",
    "fedmq_updates_received",
    "fedmq_updates_applied",
    "fedmq_updates_rejected",
    "fedmq_updates_clipped",
    "fedmq_dp_epsilon",
    "fedmq_dp_target_epsilon",
    "fedmq_dp_delta",
    "fedmq_dp_steps",
)


def status(metrics_url: str, timeout_s: float = 5.0) -> int:
    """Print what a running aggregator reports on its Prometheus endpoint (``fedmq
    aggregator --metrics-port``): version, updates, rejections by reason, the privacy
    spent (``fedmq_dp_*``, devices' own epsilon), the settings in force. 0 on success.

    Read from the metrics endpoint rather than asked over the broker: it is what the
    operator's monitoring already scrapes, needs no key, and cannot change anything.
    """
    try:
        with urllib.request.urlopen(metrics_url, timeout=timeout_s) as response:
            text = response.read().decode("utf-8")
    except (urllib.error.URLError, OSError, ValueError) as error:
        reason = getattr(error, "reason", error)
        shown = redact_url(metrics_url)  # a scrape URL may carry basic-auth credentials
        raise ConfigError(f"ctl status: cannot read {shown}: {reason}") from None
    lines: dict[str, list[str]] = {}
    for family in text_string_to_metric_families(text):
        if not family.name.startswith("fedmq_") or family.type in ("histogram", "summary"):
            continue
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            shown = f"{sample.name}{{{labels}}}" if labels else sample.name
            lines.setdefault(family.name, []).append(f"{shown} {_number(sample.value)}")
    if not lines:
        raise ConfigError(
            f"ctl status: {redact_url(metrics_url)} has no fedmq metrics (not an aggregator?)"
        )
    epsilon = _first(lines, "fedmq_dp_epsilon")
    if epsilon is not None:
        target = _first(lines, "fedmq_dp_target_epsilon")
        delta = _first(lines, "fedmq_dp_delta")
        steps = _first(lines, "fedmq_dp_steps")
        print(
            f"client-level DP: epsilon {epsilon}"
            + (f" of {target}" if target is not None else "")
            + f" at delta {delta} after {steps} server steps"
        )
    else:
        print("client-level DP: off")
    ordered = [n for n in _HEADLINE if n in lines] + sorted(set(lines) - set(_HEADLINE))
    for name in ordered:
        for line in lines[name]:
            print(line)
    return 0


def _first(lines: dict[str, list[str]], name: str) -> str | None:
    found = lines.get(name)
    return found[0].rsplit(" ", 1)[1] if found else None


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.6g}"
