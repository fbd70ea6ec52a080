"""Who may steer a running aggregator: the gate in front of every control command.

A control command (``fedmq ctl``, ``fedmq.control/1``) changes what the aggregator
does for the whole fleet, so it is applied only if it comes from an authenticated
operator, and never faster than a small rate. ``ControlGate.admit`` checks, in order:

1. **Who sent it.** Either it is signed (``fedmq.signed/1``) by a key of the operator
   registry (``operator_keys``, e.g. ``--operator-keys``), or the broker itself
   authenticated its publisher (``accept_unsigned``: AMQP with ``control_publisher``,
   whose ``user_id`` RabbitMQ verifies and the transport checks; MQTT only when the
   operator states that the broker's ACL lets nobody else publish on the control
   topic, since an MQTT subscriber cannot see who published). With neither, every
   command is refused (``unauthenticated``): there is no default operator.
   An unsigned command is ``unsigned`` unless ``accept_unsigned``: both are seen
   from the first bytes, before anything else, so a device's flood of unsigned
   commands does not use up the operator's rate.
2. **Rate** (``rate_per_s``, ``burst``: a token bucket). Over the rate the command is
   refused (``rate_limited``) before its signature is checked or its body parsed, so
   a flood costs a counter increment each and never a checkpoint write.
3. **Signature**: with keys configured, a signed command must verify (``unknown_key``,
   ``bad_signature``); without, a signed one is unwrapped unchecked, like an unsigned one.
4. **Replays** (signed commands): ``issued`` must lie within ``max_age_s`` of the
   aggregator's clock, either way, and be later than the ``issued`` of the last signed
   command admitted (kept in the checkpoint), so a copy of a signed command is
   refused (``replayed``) now, later, and after a restart.

Refusals are counted by reason and logged; a flood logs the first refusal of each
reason and then one line a minute with how many were not logged (``suppressed``).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fedmq._log import log_event
from fedmq.errors import ConfigError, Reason, Rejection
from fedmq.wire import (
    CONTROL_LIMITS,
    SCHEMA_SIGNED,
    ControlEnvelope,
    Verifier,
    decode_control,
    is_signed,
    open_signed,
)

__all__ = ["HINT", "ControlConfig", "ControlGate", "TokenBucket"]

_log = logging.getLogger("fedmq.aggregator")

# Said with the first "unauthenticated" refusal: how to turn fedmq ctl on.
HINT = (
    "control commands are refused: no operator is configured. Start the aggregator with "
    "--operator-keys DIR (public keys of `fedmq keys create --id operator`; send with "
    "`fedmq ctl --signing-key operator.key`), or, where the broker authenticates the "
    "sender, --control-publisher operator (AMQP) or --control-acl (MQTT, broker ACL)"
)
_QUIET_S = 60.0  # a flood of refusals: at most one log line per reason this often


@dataclass(frozen=True, kw_only=True)
class ControlConfig:
    """Which control commands the aggregator applies (see the module docstring).

    ``operator_keys``: apply commands signed by these keys (``fedmq.signed/1``).
    ``accept_unsigned``: also apply unsigned commands, because the broker authenticates
    their publisher (AMQP ``control_publisher``, or an MQTT ACL the operator vouches for).
    ``rate_per_s``, ``burst``: the token bucket in front of everything else.
    ``max_age_s``: a signed command's ``issued`` within this of the aggregator's clock.
    """

    operator_keys: Verifier | None = None
    accept_unsigned: bool = False
    rate_per_s: float = 2.0
    burst: int = 10
    max_age_s: float = 300.0

    def __post_init__(self) -> None:
        if not self.rate_per_s > 0:
            raise ConfigError(f"control_rate: {self.rate_per_s} must be > 0 (commands/s)")
        if self.burst < 1:
            raise ConfigError(f"control_burst: {self.burst} must be >= 1")
        if not self.max_age_s > 0:
            raise ConfigError(f"control_max_age: {self.max_age_s} must be > 0 (seconds)")

    @property
    def enabled(self) -> bool:
        """Whether any command can be applied at all."""
        return self.operator_keys is not None or self.accept_unsigned


class TokenBucket:
    """``burst`` tokens, refilled at ``rate_per_s``; ``take`` spends one if there is one."""

    def __init__(
        self, rate_per_s: float, burst: int, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._rate, self._burst, self._clock = rate_per_s, float(burst), clock
        self._tokens, self._at = float(burst), clock()

    def take(self) -> bool:
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._at) * self._rate)
        self._at = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True


@dataclass
class _Quiet:
    """Per reason: when the last line was logged, and refusals since not logged."""

    logged_at: dict[str, float] = field(default_factory=dict)
    suppressed: Counter[str] = field(default_factory=Counter)


class ControlGate:
    """Admits the commands of an authenticated operator at a bounded rate.

    ``last_issued``: the ``issued`` of the last signed command admitted (from the
    checkpoint); ``admit`` raises it. ``wall``/``clock``: injectable for tests.
    """

    def __init__(
        self,
        config: ControlConfig,
        *,
        last_issued: float = 0.0,
        wall: Callable[[], float] = time.time,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.last_issued = last_issued
        self._wall, self._clock = wall, clock
        self._bucket = TokenBucket(config.rate_per_s, config.burst, clock=clock)
        self._quiet = _Quiet()

    def admit(self, body: bytes) -> tuple[ControlEnvelope, str | None]:
        """The command and the operator key id that signed it (None: unsigned, trusted).

        Raises ``Rejection`` (rate_limited, unauthenticated, unsigned, unknown_key,
        bad_signature, replayed, or a wire-format reason) and changes nothing then.
        """
        config = self.config
        if not config.enabled:
            raise Rejection(Reason.UNAUTHENTICATED, HINT)
        if len(body) > CONTROL_LIMITS.max_message_bytes:
            raise Rejection(Reason.TOO_LARGE, f"{len(body)} bytes, a command is at most 64 KiB")
        signed = is_signed(body)  # a peek at the first keys: no payload is read
        if not signed and not config.accept_unsigned:
            raise Rejection(Reason.UNSIGNED, f"not a {SCHEMA_SIGNED} command by an operator key")
        if not self._bucket.take():
            raise Rejection(
                Reason.RATE_LIMITED,
                f"over {config.rate_per_s:g} commands/s (burst {config.burst})",
            )
        inner, key_id = body, None  # unsigned: the broker vouches for the publisher
        if signed:
            inner, key_id = open_signed(body, verifier=config.operator_keys, limits=CONTROL_LIMITS)
        command = decode_control(inner)
        if key_id is not None:  # signed and verified; without keys, signed = unsigned
            self._check_fresh(command)
        return command, key_id

    def _check_fresh(self, command: ControlEnvelope) -> None:
        now, window = self._wall(), self.config.max_age_s
        if abs(now - command.issued) > window:
            raise Rejection(
                Reason.REPLAYED,
                f"issued {command.issued:.3f} is more than {window:g} s from now ({now:.3f})",
            )
        if command.issued <= self.last_issued:
            raise Rejection(
                Reason.REPLAYED,
                f"issued {command.issued:.3f} is not after the last command's "
                f"({self.last_issued:.3f})",
            )
        self.last_issued = command.issued

    def log_refusal(self, rejection: Rejection, **fields: Any) -> None:
        """Log ``control_rejected``: the first of each reason, then at most one a minute."""
        reason, now = rejection.reason.value, self._clock()
        last = self._quiet.logged_at.get(reason)
        if last is not None and now - last < _QUIET_S:
            self._quiet.suppressed[reason] += 1
            return
        self._quiet.logged_at[reason] = now
        suppressed = self._quiet.suppressed.pop(reason, 0)
        log_event(
            _log,
            "control_rejected",
            logging.WARNING,
            reason=reason,
            detail=rejection.detail,
            suppressed=suppressed,
            **fields,
        )
