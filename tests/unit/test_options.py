"""Configuration precedence: defaults < TOML < FEDMQ_* < flags, and one-line errors."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pytest

from fedmq._options import Option, add_options, resolve_options
from fedmq.cli import COMMANDS, control_config, main, strategy_config
from fedmq.errors import ConfigError
from fedmq.strategies import StrategyConfig

OPTIONS = [
    Option("alpha", float, 0.6, "mixing"),
    Option("strategy", str, "fedasync", "strategy", ("fedasync", "fedbuff")),
    Option("eval_every", int, 5, "eval"),
    Option("error_feedback", bool, True, "ef"),
]


def _flags(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_options(parser, OPTIONS)
    return parser.parse_args(list(argv))


def test_precedence(tmp_path: Path) -> None:
    config = tmp_path / "fedmq.toml"
    config.write_text('alpha = 0.1\neval_every = 7\n[aggregator]\nstrategy = "fedbuff"\n')
    values = resolve_options(
        "aggregator",
        OPTIONS,
        _flags("--eval-every", "9"),
        config_file=config,
        environ={"FEDMQ_ALPHA": "0.3", "FEDMQ_ERROR_FEEDBACK": "false"},
    )
    assert values == {"alpha": 0.3, "strategy": "fedbuff", "eval_every": 9, "error_feedback": False}


def test_defaults_without_any_source() -> None:
    values = resolve_options("aggregator", OPTIONS, _flags(), config_file=None, environ={})
    assert values["alpha"] == 0.6 and values["strategy"] == "fedasync"


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        (
            {"FEDMQ_STRATEGY": "sgd"},
            "strategy (FEDMQ_STRATEGY): 'sgd' is not one of fedasync, fedbuff",
        ),
        ({"FEDMQ_EVAL_EVERY": "often"}, "eval_every (FEDMQ_EVAL_EVERY)"),
        ({"FEDMQ_ERROR_FEEDBACK": "maybe"}, "error_feedback (FEDMQ_ERROR_FEEDBACK)"),
    ],
)
def test_invalid_values_name_the_field(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve_options("aggregator", OPTIONS, _flags(), config_file=None, environ=environ)


def test_unknown_toml_key_is_an_error(tmp_path: Path) -> None:
    config = tmp_path / "fedmq.toml"
    config.write_text("[aggregator]\nalpah = 0.5\n")
    with pytest.raises(ConfigError, match=r"alpah .*unknown option"):
        resolve_options("aggregator", OPTIONS, _flags(), config_file=config, environ={})


def test_toml_wrong_type_is_an_error(tmp_path: Path) -> None:
    config = tmp_path / "fedmq.toml"
    config.write_text('eval_every = "5"\nalpha = true\n')
    with pytest.raises(ConfigError, match="alpha"):
        resolve_options("aggregator", OPTIONS, _flags(), config_file=config, environ={})


def test_cli_reports_invalid_config_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["aggregator", "--broker", "amqp://x/", "--alpha", "1.5"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1
    assert err.startswith("fedmq: error: ") and "alpha" in err


def test_cli_rejects_unknown_broker_scheme(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["aggregator", "--broker", "kafka://x"]) == 2
    assert "allowed schemes" in capsys.readouterr().err


def test_every_command_has_distinct_option_names() -> None:
    for name, options in COMMANDS.items():
        names = [o.name for o in options]
        assert len(names) == len(set(names)), name


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--control-rate", "0"], "control_rate"),
        (["--operator-keys", ".", "--keys-dir", "."], "operator_keys"),
    ],
)
def test_cli_refuses_bad_control_settings(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["aggregator", "--broker", "amqp://x/", *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("broker", "publisher", "acl", "unsigned"),
    [
        ("amqp://x/", None, False, False),  # the default: nobody
        ("amqps://x/", "operator", False, True),  # RabbitMQ checks user_id
        ("amqp://x/", None, True, False),  # any user may write the control queue
        ("mqtt://x", "operator", False, False),  # an MQTT subscriber cannot check it
        ("mqtt://x", None, True, True),  # the operator vouches for the broker ACL
    ],
)
def test_unsigned_commands_only_where_the_broker_authenticates(
    broker: str, publisher: str | None, acl: bool, unsigned: bool
) -> None:
    values = {"broker": broker, "job": "j", "control_publisher": publisher, "control_acl": acl}
    assert control_config(values).accept_unsigned is unsigned


def _strategy_from_flags(*argv: str) -> StrategyConfig:
    options = COMMANDS["aggregator"]
    parser = argparse.ArgumentParser()
    add_options(parser, options)
    values = resolve_options(
        "aggregator", options, parser.parse_args(list(argv)), config_file=None, environ={}
    )
    return strategy_config(values)


def test_server_lr_defaults_to_the_server_optimizers_own() -> None:
    fedbuff = ("--strategy", "fedbuff", "--server-optimizer")
    assert _strategy_from_flags(*fedbuff, "sgd").fedbuff.server_lr == 1.0
    assert _strategy_from_flags(*fedbuff, "momentum").fedbuff.server_lr == 0.1
    assert _strategy_from_flags(*fedbuff, "adam").fedbuff.server_lr == 0.01
    assert _strategy_from_flags(*fedbuff, "adam", "--server-lr", "0.03").fedbuff.server_lr == 0.03


def test_settings_known_to_diverge_are_a_warning_those_that_cannot_work_an_error(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    _strategy_from_flags("--strategy", "fedbuff", "--server-optimizer", "momentum")
    assert not [r for r in caplog.records if r.getMessage() == "risky_setting"]
    momentum = ("--strategy", "fedbuff", "--server-optimizer", "momentum", "--server-lr")
    _strategy_from_flags(*momentum, "1.0")  # the old default: an effective step of 10
    (risky,) = [r for r in caplog.records if r.getMessage() == "risky_setting"]
    assert risky.levelno == logging.WARNING
    assert "effective step lr / (1 - momentum) of 10" in risky.__dict__["fedmq_fields"]["detail"]
    assert main(["aggregator", "--broker", "amqp://x/", *momentum, "20"]) == 2
    assert "server_lr: must be <= 10 with momentum 0.9" in capsys.readouterr().err
