"""The ``fedmq`` command: the only place configuration is read.

    fedmq demo           a whole fleet on one machine (embedded broker by default)
    fedmq aggregator     the aggregator service against a real broker
    fedmq participant    one device against a real broker
    fedmq bench          fleet time-to-accuracy, codecs, virtual clock, ingest rate
    fedmq ctl            change a running aggregator's staleness settings (live tuning)
    fedmq keys           Ed25519 keys for signed updates and models

Every option can come from a TOML file (``--config``), a ``FEDMQ_<NAME>``
environment variable or a ``--name`` flag, in that order of precedence (flags
win). Invalid configuration is a one-line error naming the field.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from fedmq._log import configure_logging, log_event
from fedmq._options import Option, add_options, resolve_options
from fedmq.aggregator import AggregatorConfig, BoundsConfig, ControlConfig, FedEvalConfig
from fedmq.codecs import CodecConfig
from fedmq.errors import ConfigError, FedmqError
from fedmq.participant import ParticipantConfig
from fedmq.privacy import ClientDPConfig, DPSGDConfig, LocalDPConfig
from fedmq.strategies import (
    FedAsyncConfig,
    FedAvgConfig,
    FedBuffConfig,
    RobustConfig,
    StalenessConfig,
    StrategyConfig,
    strategy_warnings,
)
from fedmq.tasks import DeviceData, Task
from fedmq.transport import SENDER_IDENTITIES, TransportConfig
from fedmq.wire import KeyRing, Signer, Verifier, WireLimits

__all__ = ["main"]

Values = dict[str, Any]
_log = logging.getLogger("fedmq.config")

_COMMON = [
    Option("job", str, "default", "job name; namespaces every queue and topic"),
    Option(
        "task",
        str,
        "fmnist",
        "what to train: fmnist, air-quality, FILE.py:OBJECT, MODULE:OBJECT or a plugin name",
    ),
    Option(
        "data_dir",
        str,
        None,
        "folder holding the built-in tasks' data (fashion-mnist/, beijing-air-quality/)",
    ),
    Option("model", str, "cnn-s", "fmnist: model architecture", ("cnn-s", "mlp")),
    Option(
        "max_message_bytes",
        int,
        None,
        "largest message sent or accepted (default: what the model needs, 9 bytes a value)",
    ),
    Option("log_level", str, "info", "log level", ("debug", "info", "warning", "error")),
    Option("log_format", str, "text", "log line format", ("text", "json")),
]
_BROKER = Option("broker", str, None, "broker URL: amqp://user:pass@host/, mqtt://host:1883")
_STRATEGY = [
    Option("strategy", str, "fedasync", "aggregation strategy", ("fedasync", "fedbuff", "fedavg")),
    Option("alpha", float, 0.6, "FedAsync mixing weight alpha"),
    Option(
        "staleness",
        str,
        "polynomial",
        "staleness function s(d)",
        ("constant", "polynomial", "hinge", "exponential"),
    ),
    Option("staleness_a", float, 0.5, "staleness parameter a"),
    Option("staleness_b", int, 4, "hinge staleness parameter b"),
    Option("max_staleness", int, 50, "drop updates staler than this many versions"),
    Option("buffer_size", int, 10, "FedBuff: deltas per server step (K)"),
    Option(
        "server_lr",
        float,
        None,
        "FedBuff: server learning rate (default: sgd 1.0, momentum 0.1, adam 0.01)",
    ),
    Option("server_optimizer", str, "sgd", "FedBuff server optimizer", ("sgd", "momentum", "adam")),
    Option("clients_per_round", int, 10, "FedAvg: participants per round (C)"),
    Option(
        "robust",
        str,
        "mean",
        "FedBuff: robust rule of the buffer (mean: none; docs/privacy.md)",
        ("mean", "median", "trimmed_mean", "norm_bounded"),
    ),
    Option("trim_fraction", float, 0.1, "FedBuff trimmed_mean: share cut at each end"),
    Option(
        "norm_bound_factor",
        float,
        2.0,
        "FedBuff norm_bounded: clip each delta to this x the buffer's median norm",
    ),
    Option(
        "outlier_factor",
        float,
        0.0,
        "FedAsync: refuse norms above median + this x MAD of recent ones (0: off)",
    ),
    Option("publish_every", int, 1, "republish the model every N versions"),
    Option(
        "publish_interval", float, 0.2, "seconds at least between model publishes (newest wins)"
    ),
    Option(
        "eval_every",
        int,
        5,
        "evaluate on the own held-out set every M versions (0: off)",
    ),
    Option("eval_examples", int, 10_000, "fmnist: test images of the aggregator's held-out set"),
    Option(
        "fed_eval_window", int, 20, "combine device evaluation reports of the newest M versions"
    ),
    Option(
        "fed_eval_min_devices",
        int,
        1,
        "record a fleet evaluation once this many devices report",
    ),
    Option("prefetch", int, 32, "updates in flight from the broker (back-pressure)"),
]
_DURABILITY = [
    Option("checkpoint_dir", str, None, "durable aggregator state; resumes from it on start"),
    Option("checkpoint_every", int, 16, "checkpoint after this many settled updates"),
    Option("checkpoint_interval", float, 2.0, "... or after this many seconds"),
    Option("shutdown_timeout", float, 30.0, "seconds allowed for a graceful stop"),
    Option("allowed_participants", str, None, "comma-separated allow-list of participant ids"),
    Option("max_update_norm", float, 1e4, "reject updates with a larger L2 norm (absolute cap)"),
    Option(
        "update_norm_factor",
        float,
        10.0,
        "reject updates above this times the median norm of recent ones (0: off)",
    ),
    Option("max_num_examples", int, 1_000_000, "reject updates claiming more examples"),
]
_CLIP = Option(
    "clip_norm",
    float,
    None,
    "clip every update to this L2 norm (devices: before the codec; aggregator: see"
    " --clip-mode; required with client-level DP)",
)
_PRIVACY = [
    _CLIP,
    Option(
        "clip_mode",
        str,
        "clip",
        "aggregator: an update above --clip-norm is scaled to it, or refused (clip_bound)",
        ("clip", "reject"),
    ),
    Option(
        "dp_epsilon",
        float,
        None,
        "client-level DP (FedBuff): the epsilon budget; stops before the step that exceeds it",
    ),
    Option("dp_delta", float, 1e-5, "client-level DP: delta"),
    Option(
        "dp_noise_multiplier",
        float,
        None,
        "client-level DP: noise std z on the sum, in units of --clip-norm"
        " (default: calibrated from --dp-epsilon and --dp-planned-steps)",
    ),
    Option(
        "dp_min_gap", int, 1, "client-level DP: server steps at least between a device's updates"
    ),
    Option(
        "dp_planned_steps",
        int,
        None,
        "client-level DP: server steps the budget is planned for (calibrates the noise)",
    ),
    Option(
        "dp_adaptive_quantile",
        float,
        None,
        "client-level DP: adaptive clipping, C tracks this quantile of update norms"
        " (--clip-norm is the start)",
    ),
    Option("dp_adaptive_lr", float, 0.2, "client-level DP: adaptive clipping's learning rate"),
    Option(
        "dp_count_noise",
        float,
        0.0,
        "client-level DP: noise std of adaptive clipping's count (Andrew et al.: K / 20)",
    ),
]
_TRAINING = [
    Option("epochs", int, None, "local epochs per update (default: the task's)"),
    Option("batch_size", int, None, "local batch size (default: the task's)"),
    Option("lr", float, None, "local learning rate (default: the task's)"),
    Option("device_eval_every", int, 10, "devices score every N-th version held (0: never)"),
    Option("codec", str, "float32", "update codec", ("float32", "float16", "int8", "int4", "topk")),
    Option("block_size", int, 64, "int8/int4: values per scale"),
    Option("stochastic_rounding", bool, False, "unbiased stochastic rounding for int8/int4"),
    Option("topk_fraction", float, 0.01, "top-k: fraction of entries sent"),
    Option("topk_values", str, "float32", "top-k: value codec", ("float32", "float16", "int8")),
    Option("error_feedback", bool, True, "keep what the codec dropped and add it next round"),
    Option(
        "partition", str, "dirichlet", "fmnist: how the training set is split", ("dirichlet", "iid")
    ),
    Option("dirichlet_alpha", float, 0.5, "fmnist: label skew of the Dirichlet split"),
    Option("seed", int, 0, "seed of the split, the initial model and the local shuffles"),
    # Privacy on the device (docs/privacy.md); distinct from the aggregator's --dp-epsilon.
    Option("dp_sgd_epsilon", float, None, "DP-SGD on the device: budget epsilon (calibrates z)"),
    Option("dp_sgd_noise_multiplier", float, None, "DP-SGD on the device: noise multiplier z"),
    Option("max_grad_norm", float, 1.0, "DP-SGD: per-example gradient clip norm"),
    Option("dp_sgd_delta", float, 1e-5, "DP-SGD: delta of the device's (epsilon, delta)"),
    Option("dp_sgd_epochs", int, 20, "DP-SGD: local epochs the budget is calibrated for"),
    Option("local_dp_epsilon", float, None, "local DP: the device's budget epsilon"),
    Option("local_dp_noise_multiplier", float, None, "local DP: noise multiplier z"),
    Option("local_dp_clip_norm", float, 1.0, "local DP: the update's L2 clip bound C"),
    Option("local_dp_delta", float, 1e-5, "local DP: delta of the device's (epsilon, delta)"),
    Option("local_dp_updates", int, 100, "local DP: updates the budget is calibrated for"),
]
_PARTICIPANT = [
    _BROKER,
    Option("id", str, None, "participant id (unique in the job)"),
    Option("data", str, None, "this device's own data: the file or folder its task reads"),
    Option("shard", str, None, "fmnist: which part of the split this device holds: I/N"),
    Option("state_dir", str, None, "outbox and counters (default: ./fedmq-state/<id>)"),
    Option("once_per_version", bool, False, "train once per model version (sync FedAvg)"),
    Option("publish_delay", float, 0.0, "seconds to wait after training (slow device)"),
    Option("max_examples", int, 0, "fmnist: at most this many of the shard's examples (0: all)"),
]
_DEMO = [
    Option("broker", str, "memory://demo", "broker URL (default: embedded, nothing to install)"),
    Option("participants", int, 0, "simulated devices (0: the task's fleet; fmnist 20)"),
    Option(
        "target",
        float,
        None,
        "stop when the task's target metric reaches this (default: the task's goal,"
        " fmnist accuracy 0.80)",
    ),
    Option("max_seconds", float, 600.0, "stop after this many seconds regardless"),
    Option("train_slots", int, 2, "devices training at the same time (CPU cores)"),
    Option("out_dir", str, None, "where the report and plot go (default: runs/demo-<time>)"),
]

_BENCH = [
    Option(
        "broker",
        str,
        "amqp://guest:guest@127.0.0.1:5672/",
        "broker URL (bench: the local RabbitMQ by default)",
    ),
    Option(
        "devices",
        int,
        None,
        "bench: devices in the fleet, N (default: fmnist 50 as BENCHMARK.md, other tasks"
        " their own fleet)",
    ),
    Option("concurrency", int, 10, "bench: devices training at the same time (C)"),
    next(option for option in _DEMO if option.name == "target"),
    Option("max_seconds", float, 600.0, "stop after this many seconds regardless"),
    Option(
        "max_versions",
        int,
        0,
        "bench: stop once the model reaches this version (server steps; 0: off)",
    ),
    Option("mean_online", float, 60.0, "bench: mean online period of a device (s, exponential)"),
    Option("mean_offline", float, 20.0, "bench: mean offline period of a device (s, exponential)"),
    Option("delay_unit", float, 2.0, "bench: device i publishes speed_i x this (s) after training"),
    Option("speed_sigma", float, 1.0, "bench: sigma of the log-normal device speed factors"),
    Option(
        "downlink_codec",
        str,
        "int4",
        "models to devices as deltas coded so (none: full float32 every time)",
        ("none", "float16", "int8", "int4"),
    ),
    Option("keyframe_every", int, 20, "a full float32 model at least every N versions"),
    Option(
        "byzantine",
        float,
        0.0,
        "bench: share of the devices that attack (--attack), chosen by a seeded rule",
    ),
    Option(
        "attack",
        str,
        "scale",
        "bench: what the --byzantine devices do (docs/privacy.md)",
        ("sign-flip", "scale", "noise", "label-flip"),
    ),
    Option(
        "attack_strength",
        float,
        None,
        "bench: lambda of sign-flip (default 4) and scale (default 10), noise's norm"
        " multiple (default 1)",
    ),
    Option("suite", bool, False, "bench: the protocol's matrix (7 configurations)"),
    Option("virtual", bool, False, "bench: simulated time, no broker, no sleeps"),
    Option("throughput", bool, False, "bench: aggregator ingest rate vs a bare consumer"),
    Option("out_dir", str, None, "where the report and plots go (default: runs/<command>-<time>)"),
]

_ID = next(option for option in _PARTICIPANT if option.name == "id")
_KEYS_DIR = Option(
    "keys_dir", str, None, "device public keys, <key_id>.pub (aggregator: require signed updates)"
)
_SIGNING_KEY = Option(
    "signing_key", str, None, "this process's Ed25519 private key: signs what it sends"
)
_AGGREGATOR_OPS = [
    Option("data", str, None, "the aggregator's own held-out data, if any (the task reads it)"),
    _KEYS_DIR,
    _SIGNING_KEY,
    Option(
        "operator_keys",
        str,
        None,
        "operator public keys, <key_id>.pub (folder or file): apply fedmq ctl commands they sign",
    ),
    Option(
        "control_publisher",
        str,
        None,
        "AMQP: apply unsigned fedmq ctl commands from this broker user (user_id, broker-checked)",
    ),
    Option(
        "control_acl",
        bool,
        False,
        "MQTT: the broker ACL lets only the operator publish control: apply unsigned commands",
    ),
    Option("control_rate", float, 2.0, "control commands taken per second at most"),
    Option("control_burst", int, 10, "control commands taken at once before the rate applies"),
    Option("control_max_age", float, 300.0, "seconds a signed control command is valid"),
    Option(
        "sender_identity",
        str,
        "claimed",
        "AMQP: an update's sender is its broker login (user_id) or its claimed header",
        SENDER_IDENTITIES,
    ),
    Option("metrics_port", int, 0, "Prometheus metrics on this port (0: off)"),
    Option("metrics_host", str, "127.0.0.1", "address the metrics endpoint listens on"),
    Option("active_window", float, 60.0, "metrics: seconds a device stays active after an update"),
]
_PARTICIPANT_OPS = [
    _SIGNING_KEY,
    Option("aggregator_key", str, None, "aggregator public key (file or folder): verify models"),
    Option("model_publisher", str, None, "AMQP: take models only from this broker user"),
]
_LOGGING = [option for option in _COMMON if option.name in ("log_level", "log_format")]
_CTL = [
    _BROKER,
    *(option for option in _COMMON if option.name == "job"),
    dataclasses.replace(_SIGNING_KEY, help="operator's Ed25519 private key: signs the command"),
    Option(
        "metrics_url",
        str,
        "http://127.0.0.1:9100/metrics",
        "ctl status: the aggregator's Prometheus endpoint (fedmq aggregator --metrics-port)",
    ),
    *_LOGGING,
]
_KEYS = [
    _ID,
    Option("out", str, None, "keys create: folder for the new <id>.key and <id>.pub"),
    Option("pub", str, None, "keys register: the device's public key file"),
    _KEYS_DIR,
    *_LOGGING,
]
# Commands made of actions (`fedmq ctl set`): action -> (help, positional arguments).
# Positional arguments are not configuration: never read from TOML or the environment.
_Action = tuple[str, list[tuple[str, dict[str, Any]]]]
_ACTIONS: dict[str, dict[str, _Action]] = {
    "ctl": {
        "set": (
            "change settings of the running aggregator: alpha, staleness, staleness_a, "
            "staleness_b, max_staleness, buffer_size, server_lr, clients_per_round, robust, "
            "trim_fraction, norm_bound_factor, outlier_factor (docs/tuning.md)",
            [("assignments", {"nargs": "+", "metavar": "NAME=VALUE"})],
        ),
        "reset": ("back to the settings the aggregator was started with", []),
        "status": (
            "what the running aggregator reports: version, updates, rejections, the privacy "
            "spent (epsilon), settings in force; read from its metrics endpoint "
            "(--metrics-url)",
            [],
        ),
        "forget-device": (
            "drop one device's sequence number (its state was wiped, or a forged update "
            "left a huge one): its next update is taken whatever its seq",
            [("assignments", {"nargs": 1, "metavar": "PARTICIPANT"})],
        ),
    },
    "keys": {
        "create": ("a new key pair: --id ID --out DIR writes ID.key (0600) and ID.pub", []),
        "register": ("add a public key to a registry: --id ID --pub FILE --keys-dir DIR", []),
        "list": ("the keys of a registry: --keys-dir DIR", []),
    },
}

COMMANDS: dict[str, list[Option]] = {
    "aggregator": [_BROKER, *_COMMON, *_STRATEGY, *_DURABILITY, *_PRIVACY, *_AGGREGATOR_OPS],
    "participant": [*_PARTICIPANT, *_COMMON, *_TRAINING, _CLIP, *_PARTICIPANT_OPS],
    "demo": [*_DEMO, *_COMMON, *_STRATEGY, *_TRAINING, *_PRIVACY],
    "bench": [
        *_BENCH,
        *_COMMON,
        # Every version is evaluated (latest wins): a sync round is one version.
        *(o if o.name != "eval_every" else dataclasses.replace(o, default=1) for o in _STRATEGY),
        *_TRAINING,
        *_PRIVACY,
        # the update norm bounds: a robustness run measures a defence with them off
        *(o for o in _DURABILITY if o.name in ("max_update_norm", "update_norm_factor")),
    ],
    "ctl": _CTL,
    "keys": _KEYS,
}


def transport_config(v: Values, *, service: bool = False) -> TransportConfig:
    """``service``: a long-running process that waits for a broker that is down at start."""
    if not v["broker"]:
        raise ConfigError(
            "broker: required, e.g. amqp://guest:guest@localhost/ or mqtt://localhost"
        )
    return TransportConfig(
        url=v["broker"],
        job=v["job"],
        max_message_bytes=v["max_message_bytes"],
        prefetch=v.get("prefetch", 32),
        control_publisher=v.get("control_publisher"),
        model_publisher=v.get("model_publisher"),
        sender_identity=v.get("sender_identity", "claimed"),
        wait_for_broker=service,
    )


def strategy_config(v: Values) -> StrategyConfig:
    """The strategy the options describe; settings known to diverge are logged as warnings."""
    staleness = StalenessConfig(function=v["staleness"], a=v["staleness_a"], b=v["staleness_b"])
    robust = RobustConfig(
        rule=v["robust"],
        trim_fraction=v["trim_fraction"],
        norm_bound_factor=v["norm_bound_factor"],
        outlier_factor=v["outlier_factor"],
    )
    config = StrategyConfig(
        name=v["strategy"],
        max_staleness=v["max_staleness"],
        fedasync=FedAsyncConfig(alpha=v["alpha"], staleness=staleness),
        fedbuff=FedBuffConfig(
            buffer_size=v["buffer_size"],
            server_lr=v["server_lr"],
            staleness=staleness,
            server_optimizer=v["server_optimizer"],
        ),
        fedavg=FedAvgConfig(clients_per_round=v["clients_per_round"]),
        robust=robust,
    )
    for warning in strategy_warnings(config):
        log_event(_log, "risky_setting", logging.WARNING, strategy=config.name, detail=warning)
    return config


def aggregator_config(v: Values) -> AggregatorConfig:
    allowed = v.get("allowed_participants")
    checkpoint_dir = v.get("checkpoint_dir")
    if checkpoint_dir and v.get("checkpoint_every", 16) > v.get("prefetch", 32):
        raise ConfigError(
            "checkpoint_every: must be <= prefetch (the broker stops delivering at prefetch)"
        )
    return AggregatorConfig(
        checkpoint_dir=Path(checkpoint_dir) if checkpoint_dir else None,
        checkpoint_every=v.get("checkpoint_every", 16),
        checkpoint_interval_s=v.get("checkpoint_interval", 2.0),
        shutdown_timeout_s=v.get("shutdown_timeout", 30.0),
        allowed_participants=frozenset(p.strip() for p in allowed.split(",") if p.strip())
        if allowed
        else None,
        bounds=BoundsConfig(
            max_update_norm=v.get("max_update_norm", 1e4),
            norm_factor=v.get("update_norm_factor", 10.0),
            max_num_examples=v.get("max_num_examples", 1_000_000),
            # Adaptive clipping: the DP mechanism clips to the C in force, not to the start.
            clip_norm=None if v.get("dp_adaptive_quantile") is not None else v.get("clip_norm"),
            clip_mode=v.get("clip_mode", "clip"),
        ),
        privacy=privacy_config(v),
        seed=v.get("seed", 0),
        strategy=strategy_config(v),
        publish_every=v["publish_every"],
        publish_interval_s=v["publish_interval"],
        eval_every=v["eval_every"],
        fed_eval=FedEvalConfig(window=v["fed_eval_window"], min_devices=v["fed_eval_min_devices"]),
        limits=WireLimits(max_message_bytes=v["max_message_bytes"]),
        update_verifier=_verifier(v.get("keys_dir"), v["job"]),
        model_signer=_signer(v.get("signing_key"), v["job"]),
        control=control_config(v),
    )


def privacy_config(v: Values) -> ClientDPConfig | None:
    """Client-level DP (central model), on when ``dp_epsilon`` or ``dp_noise_multiplier``
    is given; it needs ``clip_norm`` (the sensitivity)."""
    epsilon, z = v.get("dp_epsilon"), v.get("dp_noise_multiplier")
    if epsilon is None and z is None:
        return None
    if v.get("clip_norm") is None:
        raise ConfigError(
            "clip_norm: required with client-level DP (--dp-epsilon / --dp-noise-multiplier)"
        )
    return ClientDPConfig(
        clip_norm=v["clip_norm"],
        noise_multiplier=z,
        target_epsilon=epsilon,
        delta=v.get("dp_delta", 1e-5),
        min_gap=v.get("dp_min_gap", 1),
        planned_steps=v.get("dp_planned_steps"),
        adaptive_quantile=v.get("dp_adaptive_quantile"),
        adaptive_lr=v.get("dp_adaptive_lr", 0.2),
        count_noise=v.get("dp_count_noise", 0.0),
    )


def control_config(v: Values) -> ControlConfig:
    """Who may send ``fedmq ctl`` commands (aggregator/_control.py); nobody by default.

    Unsigned commands are taken only where the broker authenticates their publisher:
    AMQP with ``control_publisher`` (RabbitMQ checks ``user_id``), MQTT with
    ``control_acl`` (the operator says the broker's ACL lets nobody else publish). The
    other transport's setting is ignored with a warning: it would authenticate nothing.
    """
    amqp = v["broker"].split("://", 1)[0] in ("amqp", "amqps")
    publisher, acl = v.get("control_publisher"), v.get("control_acl", False)
    ignored = (
        "control_publisher" if publisher and not amqp else "control_acl" if acl and amqp else None
    )
    if ignored is not None:
        log_event(
            _log,
            "control_setting_ignored",
            logging.WARNING,
            setting=ignored,
            why="an MQTT subscriber cannot see who published; use --control-acl or --operator-keys"
            if ignored == "control_publisher"
            else "AMQP: any user may write the control queue; use --control-publisher or "
            "--operator-keys",
        )
    keys, devices = v.get("operator_keys"), v.get("keys_dir")
    if keys and devices and Path(keys).resolve() == Path(devices).resolve():
        raise ConfigError("operator_keys: must not be the device key registry (--keys-dir)")
    return ControlConfig(
        operator_keys=_verifier(keys, v["job"]),
        accept_unsigned=bool(publisher) if amqp else acl,
        rate_per_s=v.get("control_rate", 2.0),
        burst=v.get("control_burst", 10),
        max_age_s=v.get("control_max_age", 300.0),
    )


def _verifier(path: str | None, job: str) -> Verifier | None:
    return Verifier(KeyRing(Path(path)), job) if path else None


def _signer(path: str | None, job: str) -> Signer | None:
    return Signer.from_file(Path(path), job) if path else None


def codec_config(v: Values) -> CodecConfig:
    return CodecConfig(
        name=v["codec"],
        block_size=v["block_size"],
        stochastic_rounding=v["stochastic_rounding"],
        topk_fraction=v["topk_fraction"],
        topk_values=v["topk_values"],
    )


def dp_sgd_config(v: Values) -> DPSGDConfig | None:
    """``--dp-sgd-epsilon`` / ``--dp-sgd-noise-multiplier`` (None when neither is given)."""
    if v.get("dp_sgd_epsilon") is None and v.get("dp_sgd_noise_multiplier") is None:
        return None
    return DPSGDConfig(
        target_epsilon=v["dp_sgd_epsilon"],
        noise_multiplier=v["dp_sgd_noise_multiplier"],
        max_grad_norm=v["max_grad_norm"],
        delta=v["dp_sgd_delta"],
        planned_epochs=v["dp_sgd_epochs"],
    )


def local_dp_config(v: Values) -> LocalDPConfig | None:
    """``--local-dp-epsilon`` / ``--local-dp-noise-multiplier`` (None when neither)."""
    if v.get("local_dp_epsilon") is None and v.get("local_dp_noise_multiplier") is None:
        return None
    return LocalDPConfig(
        target_epsilon=v["local_dp_epsilon"],
        noise_multiplier=v["local_dp_noise_multiplier"],
        clip_norm=v["local_dp_clip_norm"],
        delta=v["local_dp_delta"],
        planned_updates=v["local_dp_updates"],
    )


def participant_config(v: Values, participant_id: str, state_dir: Path) -> ParticipantConfig:
    return ParticipantConfig(
        participant_id=participant_id,
        state_dir=state_dir,
        seed=v["seed"],
        eval_every=v.get("device_eval_every", 10),
        codec=codec_config(v),
        error_feedback=v["error_feedback"],
        once_per_version=v.get("once_per_version", False),
        publish_delay_s=v.get("publish_delay", 0.0),
        limits=WireLimits(max_message_bytes=v["max_message_bytes"]),
        update_signer=_signer(v.get("signing_key"), v["job"]),
        model_verifier=_verifier(v.get("aggregator_key"), v["job"]),
        # With adaptive clipping the simulated devices leave clipping to the aggregator
        # (they cannot know the C in force).
        clip_norm=None if v.get("dp_adaptive_quantile") is not None else v.get("clip_norm"),
        dp_sgd=dp_sgd_config(v),
        local_dp=local_dp_config(v),
    )


def _message_limit(task: Task) -> int:
    """The default ``max_message_bytes``: the largest update or model ``task``'s model can
    need (fedmq.wire.message_limit_for), so a larger message is refused on arrival."""
    from fedmq.models import get_params
    from fedmq.wire import message_limit_for

    return message_limit_for(get_params(task.build_model()))


# The tasks fedmq ships, besides fmnist (built from its own options): name -> object.
BUILTIN_TASKS = {
    "air-quality": "fedmq.tasks.air_quality:task",
    "fmnist": "fedmq.tasks.fashion_mnist:task",  # built from its options by task_of
}


def task_of(v: Values) -> Task:
    """The task ``--task`` names, with the training options that override its own."""
    from fedmq.tasks import load_task
    from fedmq.tasks.fashion_mnist import FmnistSettings, make_task

    if v["task"] == "fmnist":
        task = make_task(
            FmnistSettings(
                model=v["model"],
                partition=v.get("partition", "dirichlet"),
                alpha=v.get("dirichlet_alpha", 0.5),
                seed=v.get("seed", 0),
                shard=parse_shard(v["shard"]) if v.get("shard") else (0, 1),
                max_examples=v.get("max_examples", 0),
                eval_examples=v.get("eval_examples", 10_000),
            )
        )
    else:
        task = load_task(v["task"], builtins=BUILTIN_TASKS)
    overrides = {
        name: v[name] for name in ("epochs", "batch_size", "lr") if v.get(name) is not None
    }
    if overrides:
        task = dataclasses.replace(task, training=dataclasses.replace(task.training, **overrides))
    return task


def data_path(v: Values, *, required: bool) -> Path | None:
    """``--data``, or for fmnist the folder that holds fashion-mnist/ (``--data-dir``)."""
    from fedmq.data import resolve_data_dir

    if v.get("data"):
        return Path(v["data"])
    if v["task"] == "fmnist":
        return resolve_data_dir(v["data_dir"])
    if required:
        raise ConfigError(f"data: required for task {v['task']!r}: the device's own data file")
    return None


def task_of_data(task: Task, where: Path) -> DeviceData:
    """The device's data as the task reads it from ``where``; a one-line error if it
    cannot (a missing file, a format the task refuses)."""
    try:
        return task.load_data(where)
    except FedmqError:
        raise
    except Exception as error:  # the task's code: any error is the user's, in one line
        raise ConfigError(
            f"data: task {task.name!r} cannot read {str(where)!r}: {error!r}"
        ) from error


def parse_shard(text: str | None) -> tuple[int, int]:
    """``"3/20"`` -> (3, 20); the index is 0-based."""
    try:
        index, count = (int(part) for part in (text or "").split("/"))
    except ValueError:
        raise ConfigError(f"shard: {text!r} must be I/N, e.g. 0/20") from None
    if not 0 <= index < count:
        raise ConfigError(f"shard: index {index} must be in 0..{count - 1}")
    return index, count


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedmq", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    helps = {
        "demo": "a whole fleet on one machine: aggregator + devices, live progress",
        "aggregator": "run the aggregator service",
        "participant": "run one device",
        "ctl": "operator commands to a running aggregator: `ctl set NAME=VALUE...`, "
        "`ctl reset`, `ctl forget-device ID` (signed with --signing-key)",
        "keys": "signing keys: `keys create`, `keys register`, `keys list`",
        "bench": "fleet time-to-accuracy (BENCHMARK.md); --suite, --virtual, --throughput",
    }
    for name, options in COMMANDS.items():
        sub = commands.add_parser(name, help=helps[name], description=helps[name])
        if name in _ACTIONS:  # `fedmq ctl set ...`: the options belong to the action
            _add_actions(sub, options, _ACTIONS[name])
            continue
        sub.add_argument(
            "--config", "-c", type=Path, default=None, help="TOML file; env FEDMQ_CONFIG"
        )
        add_options(sub, options)
    return parser


def _add_actions(
    parser: argparse.ArgumentParser, options: list[Option], actions: dict[str, _Action]
) -> None:
    nested = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, (help_text, positionals) in actions.items():
        leaf = nested.add_parser(action, help=help_text, description=help_text)
        leaf.add_argument(
            "--config", "-c", type=Path, default=None, help="TOML file; env FEDMQ_CONFIG"
        )
        add_options(leaf, options)
        for argument, kwargs in positionals:
            leaf.add_argument(argument, **kwargs)


def _run(coroutine: Coroutine[Any, Any, int]) -> int:
    """Run the process's main coroutine; SIGTERM cancels it like Ctrl-C does."""

    async def guarded() -> int:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        return await coroutine

    try:
        return asyncio.run(guarded())
    except (KeyboardInterrupt, asyncio.CancelledError):
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedmq`` console script."""
    args = _build_parser().parse_args(argv)
    options = COMMANDS[args.command]
    every = frozenset(o.name for opts in COMMANDS.values() for o in opts)
    config_file = args.config or (
        Path(os.environ["FEDMQ_CONFIG"]) if "FEDMQ_CONFIG" in os.environ else None
    )
    try:
        values = resolve_options(
            args.command, options, args, config_file=config_file, every_name=every
        )
        if args.command in _ACTIONS:
            values.update(action=args.action, assignments=getattr(args, "assignments", []))
        configure_logging(level=values["log_level"], json_format=values["log_format"] == "json")
        if "task" in values:
            values["task_object"] = task_of(values)
        if "max_message_bytes" in values and values["max_message_bytes"] is None:
            values["max_message_bytes"] = _message_limit(values["task_object"])
        runner: Callable[[Values], Coroutine[Any, Any, int]] = _RUNNERS[args.command]
        return _run(runner(values))
    except FedmqError as error:
        print(f"fedmq: error: {error}", file=sys.stderr)
        return 2


async def _aggregator(v: Values) -> int:
    from fedmq.aggregator import MetricsConfig
    from fedmq.aggregator.main import run_aggregator

    metrics = MetricsConfig(
        port=v["metrics_port"], host=v["metrics_host"], active_window_s=v["active_window"]
    )
    task: Task = v["task_object"]
    central = None
    if task.central_data and v["eval_every"]:  # with evaluation off, no data is read
        where = data_path(v, required=False)
        central = task.central_data(where) if where else None
    return await run_aggregator(
        aggregator_config(v),
        transport_config(v, service=True),
        task,
        central,
        metrics=metrics,
    )


async def _participant(v: Values) -> int:
    from fedmq.participant.main import run_participant

    if not v["id"]:
        raise ConfigError("id: required, e.g. --id dev-01")
    if v["task"] == "fmnist" and not v["shard"]:
        raise ConfigError("shard: required for the fmnist task, e.g. --shard 0/20")
    task: Task = v["task_object"]
    state_dir = Path(v["state_dir"] or Path("fedmq-state") / v["id"])
    config = participant_config(v, v["id"], state_dir)  # the id is checked first
    where = data_path(v, required=True)
    assert where is not None
    return await run_participant(
        config, transport_config(v, service=True), task, task_of_data(task, where)
    )


async def _demo(v: Values) -> int:
    from fedmq.data import resolve_data_dir
    from fedmq.sim.demo import DemoConfig, run_demo

    config = DemoConfig(
        task=v["task_object"],
        data_dir=resolve_data_dir(v["data_dir"]),
        participants=v["participants"],
        target=v["target"],
        max_seconds=v["max_seconds"],
        train_slots=v["train_slots"],
        out_dir=Path(v["out_dir"]) if v["out_dir"] else None,
        aggregator=aggregator_config(v),
        transport=transport_config(v),
        participant=participant_config(v, "template", Path(".")),
    )
    return await run_demo(config)


async def _bench(v: Values) -> int:
    from fedmq.sim.cli_bench import run_bench_command

    return await run_bench_command(v, _bench_parts(v))


def _bench_parts(v: Values) -> dict[str, Any]:
    """The configuration objects of ``fedmq bench``, built here like every command's.

    ``task``: a picklable function that builds the task (the benchmark's aggregator runs
    in a process of its own and builds its task there)."""
    from fedmq.aggregator import DownlinkConfig
    from fedmq.data import resolve_data_dir
    from fedmq.sim._fleet import FleetProtocol

    devices = v["devices"]
    if devices is None:  # BENCHMARK.md's 50 for fmnist; any other task its own fleet
        devices = FleetProtocol().participants if v["task"] == "fmnist" else 0
    protocol = FleetProtocol(
        participants=devices,
        dirichlet_alpha=v["dirichlet_alpha"],
        seed=v["seed"],
        speed_sigma=v["speed_sigma"],
        delay_unit_s=v["delay_unit"],
        mean_online_s=v["mean_online"],
        mean_offline_s=v["mean_offline"],
        concurrency=v["concurrency"],
        target=v["target"],
        max_seconds=v["max_seconds"],
        max_versions=v["max_versions"],
    )
    downlink = DownlinkConfig(
        codec=None
        if v["downlink_codec"] == "none"
        else CodecConfig(name=v["downlink_codec"], block_size=v["block_size"]),
        keyframe_every=v["keyframe_every"],
    )
    aggregator = dataclasses.replace(aggregator_config(v), downlink=downlink)
    from fedmq.sim._attacks import AttackConfig, check_attack

    attack = AttackConfig(
        fraction=v["byzantine"], kind=v["attack"], strength=v["attack_strength"], seed=v["seed"]
    )
    check_attack(attack, v["task_object"])
    plain = {name: value for name, value in v.items() if name != "task_object"}
    return {
        "task": functools.partial(task_of, plain),
        "data_dir": None if v["throughput"] else resolve_data_dir(v["data_dir"]),
        "protocol": protocol,
        "aggregator": aggregator,
        "transport": transport_config(v),
        "participant": participant_config(v, "template", Path(".")),
        "attack": attack,
    }


async def _ctl(v: Values) -> int:
    from fedmq.admin import ctl, status

    if v["action"] == "status":
        return status(v["metrics_url"])
    config = transport_config({**v, "max_message_bytes": 64 * 1024 * 1024})
    return await ctl(config, v["action"], v["assignments"], _signer(v["signing_key"], v["job"]))


async def _keys(v: Values) -> int:
    from fedmq.admin import keys

    return keys(v["action"], key_id=v["id"], out=v["out"], pub=v["pub"], keys_dir=v["keys_dir"])


_RUNNERS = {
    "aggregator": _aggregator,
    "participant": _participant,
    "demo": _demo,
    "bench": _bench,
    "ctl": _ctl,
    "keys": _keys,
}


if __name__ == "__main__":
    raise SystemExit(main())
