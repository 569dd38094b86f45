"""Settings from a TOML file, CKPT_WATCH_* variables and flags: precedence and every refusal."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from ckpt_watch.config import ConfigError, load_config
from ckpt_watch.config_keys import SETTINGS
from ckpt_watch.config_show import mask_url

EXAMPLE = Path(__file__).resolve().parents[1] / "systemd" / "ckpt-watch.toml"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture
def models(tmp_path: Path) -> Path:
    for name in ("a", "b"):
        (tmp_path / "models" / name).mkdir(parents=True)
    return tmp_path / "models"


@pytest.fixture
def config_file(tmp_path: Path, models: Path) -> Path:
    return write(
        tmp_path / "ckpt-watch.toml",
        f"""
        metric = "accuracy"
        reconcile = 120
        keep = 4

        [[root]]
        path = "{models / "a"}"
        reconcile = 60

        [[root]]
        path = "models/b"
        metric = "wer"
        mode = "min"
        """,
    )


# ----- precedence -------------------------------------------------------------------------


def test_defaults_without_file_env_or_flags(models: Path) -> None:
    """A root on its own gets eval_loss (min), inotify, a 300 s reconcile, and nothing else."""
    config = load_config(environ={}, roots=[models / "a"])

    (root,) = config.roots
    assert (root.metric.name, root.metric.mode) == ("eval_loss", "min")
    assert (root.poll, root.reconcile, root.history) == (None, 300.0, None)
    assert (root.keep, root.keep_top, root.keep_every, root.strip) == (None, None, None, False)
    assert (root.notify, root.notify_config, root.min_delta) == ((), None, None)
    assert (config.log_level, config.log_format, config.file) == ("info", "text", None)


def test_file_root_table_beats_file_top_level(config_file: Path, models: Path) -> None:
    """Each [[root]] inherits the top level and overrides it key by key."""
    config = load_config(config_file, environ={})

    a, b = config.roots
    assert a.path == models / "a" and b.path == models / "b"  # relative to the file
    assert (a.metric.name, a.reconcile, a.keep) == ("eval_accuracy", 60.0, 4)
    assert (b.metric.name, b.metric.mode, b.reconcile) == ("eval_wer", "min", 120.0)


def test_environment_beats_file(config_file: Path) -> None:
    """A CKPT_WATCH_* variable overrides the file, in every root table too."""
    env = {"CKPT_WATCH_RECONCILE": "30", "CKPT_WATCH_KEEP_TOP": "2", "CKPT_WATCH_STRIP": "yes"}

    config = load_config(config_file, environ=env)

    assert [root.reconcile for root in config.roots] == [30.0, 30.0]
    assert [root.keep_top for root in config.roots] == [2, 2]
    assert [root.strip for root in config.roots] == [True, True]


def test_flags_beat_environment(config_file: Path) -> None:
    """A flag overrides the environment and the file."""
    config = load_config(
        config_file,
        environ={"CKPT_WATCH_RECONCILE": "30", "CKPT_WATCH_LOG_LEVEL": "debug"},
        flags={"reconcile": 10.0, "log_level": "warning", "poll": None},
    )

    assert [root.reconcile for root in config.roots] == [10.0, 10.0]
    assert config.log_level == "warning"
    assert config.origins["log_level"] == "flag"
    assert config.root_origins[0]["reconcile"] == "flag"


def test_origins_name_each_layer(config_file: Path) -> None:
    """config show can say where every value came from."""
    config = load_config(config_file, environ={"CKPT_WATCH_KEEP_TOP": "1"})

    origins = config.root_origins[0]
    assert origins["reconcile"] == "file [[root]] 1"
    assert origins["metric"] == "file"
    assert origins["keep_top"] == "env"
    assert origins["poll"] == "default"


def test_a_metric_set_higher_up_does_not_inherit_a_lower_mode(config_file: Path) -> None:
    """--metric accuracy over a table's metric=wer, mode=min uses accuracy's own direction."""
    config = load_config(config_file, environ={}, flags={"metric": "accuracy"})

    assert [r.metric.mode for r in config.roots] == ["max", "max"]


def test_a_mode_beside_or_above_its_metric_applies(config_file: Path) -> None:
    """A mode from the same level as the metric, or a higher one, is used."""
    config = load_config(config_file, environ={"CKPT_WATCH_MODE": "min"})

    assert [r.metric.mode for r in config.roots] == ["min", "min"]


def test_command_line_roots_replace_the_file_roots_but_keep_their_tables(
    config_file: Path, models: Path, tmp_path: Path
) -> None:
    """ROOT arguments choose the roots; one with a [[root]] table keeps its settings."""
    other = tmp_path / "elsewhere"
    other.mkdir()

    config = load_config(config_file, environ={}, roots=[models / "b", other])

    b, elsewhere = config.roots
    assert b.metric.name == "eval_wer"
    assert (elsewhere.path, elsewhere.metric.name, elsewhere.reconcile) == (
        other,
        "eval_accuracy",
        120.0,
    )


def test_config_path_from_environment(config_file: Path) -> None:
    """CKPT_WATCH_CONFIG names the file when --config is not given."""
    config = load_config(environ={"CKPT_WATCH_CONFIG": str(config_file)})

    assert config.file == config_file
    assert len(config.roots) == 2


def test_empty_environment_value_means_unset(config_file: Path) -> None:
    """CKPT_WATCH_POLL= (as an EnvironmentFile may say) leaves the setting alone."""
    config = load_config(config_file, environ={"CKPT_WATCH_POLL": "", "CKPT_WATCH_NOTIFY": " "})

    assert config.roots[0].poll is None
    assert config.roots[0].notify == ()


def test_environment_values_are_typed(models: Path) -> None:
    """Numbers, switches, URL lists and a relative min_delta are read from text."""
    env = {
        "CKPT_WATCH_POLL": "2.5",
        "CKPT_WATCH_KEEP_EVERY": "500",
        "CKPT_WATCH_STRIP": "off",
        "CKPT_WATCH_NOTIFY": "json://127.0.0.1:9/a  mailto://u:p@127.0.0.1",
        "CKPT_WATCH_MIN_DELTA": "1.5%",
        "CKPT_WATCH_HISTORY": "h.jsonl",
    }

    (root,) = load_config(environ=env, roots=[models / "a"]).roots

    assert (root.poll, root.keep_every, root.strip) == (2.5, 500, False)
    assert root.notify == ("json://127.0.0.1:9/a", "mailto://u:p@127.0.0.1")
    assert root.min_delta == "1.5%"
    assert root.history == Path.cwd() / "h.jsonl"


def test_poll_zero_means_inotify(tmp_path: Path, models: Path) -> None:
    """poll = 0 in a root table turns a polling default back into inotify."""
    file = write(tmp_path / "c.toml", f'poll = 5\n[[root]]\npath = "{models / "a"}"\npoll = 0\n')

    assert load_config(file, environ={}).roots[0].poll is None


def test_credential_urls_are_added_to_notify(tmp_path: Path, models: Path) -> None:
    """Credential URLs come from $CREDENTIALS_DIRECTORY/NAME; only whole lines are comments."""
    credentials = tmp_path / "creds"
    credentials.mkdir()
    write(credentials / "notify", "# team\njson://127.0.0.1:9/x\n\nslack://a/b/c/#ml  ntfy://t\n")
    env = {"CREDENTIALS_DIRECTORY": str(credentials), "CKPT_WATCH_NOTIFY_CREDENTIAL": "notify"}

    (root,) = load_config(environ=env, roots=[models / "a"]).roots

    assert root.notify == ("json://127.0.0.1:9/x", "slack://a/b/c/#ml", "ntfy://t")
    assert root.notify_credential == "notify"


def test_example_file_is_valid_and_names_every_setting() -> None:
    """systemd/ckpt-watch.toml loads, and documents every key there is."""
    config = load_config(EXAMPLE, environ={}, credentials=False)

    text = EXAMPLE.read_text()
    assert [r.metric.name for r in config.roots] == ["eval_loss", "eval_wer"]
    missing = [name for name in SETTINGS if f"{name} =" not in text]
    assert missing == []


# ----- refusals: one line naming the key, where it came from, and what is allowed -------------


def refused(**kwargs: Any) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(**kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


BAD_VALUES = [
    ("log_level", '"loud"', "one of debug, info, warning, error"),
    ("log_format", '"xml"', "one of text, json"),
    ("metric", '"eval loss"', "a metric name"),
    ("metric", "3", "a metric name"),
    ("mode", '"up"', "min or max"),
    ("poll", "0.01", "a number of seconds >= 0.1, or 0 for inotify"),
    ("poll", '"fast"', "a number of seconds >= 0.1"),
    ("poll", "inf", "a number of seconds >= 0.1"),
    ("reconcile", "0.5", "a number of seconds >= 1"),
    ("reconcile", "true", "a number of seconds >= 1"),
    ("keep", "0", "a whole number >= 1"),
    ("keep", "-2", "a whole number >= 1"),
    ("keep", "2.5", "a whole number >= 1"),
    ("keep_top", "false", "a whole number >= 1"),
    ("keep_every", "0", "a whole number of steps >= 1"),
    ("strip", '"yes"', "true or false"),
    ("notify", '["not a url"]', "notification URLs like scheme://"),
    ("notify", "[1]", "notification URLs like scheme://"),
    ("notify_config", '"missing.yml"', "an existing apprise config file"),
    ("notify_credential", '"../x"', "a systemd credential name"),
    ("min_delta", "-0.1", "a number >= 0, or a percentage"),
    ("min_delta", '"lots"', "a number >= 0, or a percentage"),
]


@pytest.mark.parametrize(("key", "value", "allowed"), BAD_VALUES)
def test_bad_value_in_the_file_names_file_key_and_what_is_allowed(
    tmp_path: Path, models: Path, key: str, value: str, allowed: str
) -> None:
    """Every setting checks its value at the top level of the file."""
    file = write(tmp_path / "c.toml", f'{key} = {value}\n[[root]]\npath = "{models / "a"}"\n')

    message = refused(path=file, environ={})

    assert message.startswith(f"{file}: {key} must be {allowed}")


@pytest.mark.parametrize(("key", "value", "allowed"), BAD_VALUES)
def test_bad_value_in_a_root_table_names_the_table(
    tmp_path: Path, models: Path, key: str, value: str, allowed: str
) -> None:
    """Per-root keys name the [[root]] table; process-wide keys say where they belong."""
    file = write(tmp_path / "c.toml", f'[[root]]\npath = "{models / "a"}"\n{key} = {value}\n')

    message = refused(path=file, environ={})

    if SETTINGS[key].process:
        assert message == f"{file}: [[root]] 1: {key} can only be set at the top level of the file"
    else:
        assert message.startswith(f"{file}: [[root]] 1: {key} must be {allowed}")


ENV_BAD = [
    ("CKPT_WATCH_LOG_LEVEL", "loud", "one of debug"),
    ("CKPT_WATCH_POLL", "fast", "a number of seconds >= 0.1"),
    ("CKPT_WATCH_RECONCILE", "0", "a number of seconds >= 1"),
    ("CKPT_WATCH_KEEP", "0", "a whole number >= 1"),
    ("CKPT_WATCH_KEEP_TOP", "two", "a whole number >= 1"),
    ("CKPT_WATCH_STRIP", "maybe", "true or false"),
    ("CKPT_WATCH_MIN_DELTA", "x%", "a number >= 0, or a percentage"),
    ("CKPT_WATCH_MODE", "upward", "min or max"),
]


@pytest.mark.parametrize(("variable", "value", "allowed"), ENV_BAD)
def test_bad_environment_value_names_the_variable(
    models: Path, variable: str, value: str, allowed: str
) -> None:
    """A bad CKPT_WATCH_* value is refused with the variable's name and what is allowed."""
    message = refused(environ={variable: value}, roots=[models / "a"])

    assert message == f"{variable} must be {allowed}" + message.split(allowed, 1)[1]
    assert message.endswith(f", not {value!r}")


def test_bad_flag_value_names_the_flag(models: Path) -> None:
    """Flags are checked like everything else and named as typed."""
    message = refused(environ={}, flags={"log_format": "xml"}, roots=[models / "a"])

    assert message == "--log-format must be one of text, json, not 'xml'"


def test_unknown_environment_variable_is_refused(models: Path) -> None:
    """A misspelt CKPT_WATCH_ variable is an error, not silently ignored."""
    message = refused(environ={"CKPT_WATCH_METRC": "accuracy"}, roots=[models / "a"])

    assert message.startswith("CKPT_WATCH_METRC is not a setting; known: CKPT_WATCH_CONFIG, ")
    assert "CKPT_WATCH_METRIC" in message


def test_unknown_key_at_top_level_lists_the_allowed_ones(tmp_path: Path, models: Path) -> None:
    """A misspelt key is refused with the list of keys that exist."""
    file = write(tmp_path / "c.toml", f'metrc = "x"\n[[root]]\npath = "{models / "a"}"\n')

    message = refused(path=file, environ={})

    assert message.startswith(f"{file}: unknown key 'metrc'; allowed: log_level, log_format, ")


def test_unknown_key_in_a_root_table(tmp_path: Path, models: Path) -> None:
    """Root tables refuse unknown keys too, naming which table."""
    file = write(tmp_path / "c.toml", f'[[root]]\npath = "{models / "a"}"\n[[root]]\npth = "x"\n')

    message = refused(path=file, environ={})

    assert message == f"{file}: [[root]] 2: path is missing (the directory to watch)"


def test_unknown_table_is_refused(tmp_path: Path, models: Path) -> None:
    """A [defaults] section is not a thing: the top level holds the defaults."""
    file = write(tmp_path / "c.toml", f'[defaults]\nkeep = 2\n[[root]]\npath = "{models}"\n')

    assert refused(path=file, environ={}).startswith(f"{file}: unknown key 'defaults'; allowed:")


@pytest.mark.parametrize("key", ["history", "path"])
def test_per_root_only_keys_at_top_level(tmp_path: Path, models: Path, key: str) -> None:
    """history and path belong to one root, so not at the top."""
    file = write(tmp_path / "c.toml", f'{key} = "x"\n[[root]]\npath = "{models / "a"}"\n')

    message = refused(path=file, environ={})

    assert message == f"{file}: {key} belongs in a [[root]] table (each root has its own)"


def test_root_that_is_not_a_table(tmp_path: Path) -> None:
    """root = "/x" is refused: roots are [[root]] tables."""
    file = write(tmp_path / "c.toml", 'root = "/srv/models"\n')

    assert refused(path=file, environ={}) == (
        f"{file}: root must be [[root]] tables, each with a path"
    )


def test_invalid_toml_names_the_file_and_position(tmp_path: Path) -> None:
    """A syntax error says where it is."""
    file = write(tmp_path / "c.toml", "metric = \n")

    message = refused(path=file, environ={})

    assert message.startswith(f"{file}: not valid TOML: ")
    assert "line 1" in message


def test_missing_file(tmp_path: Path) -> None:
    """A config file that is not there is named."""
    message = refused(path=tmp_path / "nope.toml", environ={})

    assert message == f"{tmp_path / 'nope.toml'}: cannot read: No such file or directory"


def test_file_that_is_not_utf8(tmp_path: Path) -> None:
    """Bytes that are not UTF-8 are refused with one line."""
    file = tmp_path / "c.toml"
    file.write_bytes(b'metric = "\xff"\n')

    assert refused(path=file, environ={}) == f"{file}: not UTF-8 text"


def test_no_root_at_all() -> None:
    """Neither ROOT nor [[root]]: say how to give one."""
    assert refused(environ={}) == (
        "no root to watch: give ROOT, or [[root]] tables in a config file"
    )


def test_same_root_twice(tmp_path: Path, models: Path) -> None:
    """Two tables for one directory (even spelt differently) would fight over its lock."""
    file = write(
        tmp_path / "c.toml",
        f'[[root]]\npath = "{models / "a"}"\n[[root]]\npath = "{models / "b" / ".." / "a"}"\n',
    )

    assert refused(path=file, environ={}) == f"{file}: root {models / 'a'} is listed twice"


def test_nested_roots(tmp_path: Path, models: Path) -> None:
    """A root inside another would record the same runs twice."""
    file = write(
        tmp_path / "c.toml", f'[[root]]\npath = "{models / "a"}"\n[[root]]\npath = "{models}"\n'
    )

    assert refused(path=file, environ={}) == (
        f"{file}: root {models / 'a'} is inside root {models}; watch one or the other"
    )


def test_shared_history(tmp_path: Path, models: Path) -> None:
    """Two roots cannot write one history file."""
    file = write(
        tmp_path / "c.toml",
        f'[[root]]\npath = "{models / "a"}"\nhistory = "h.jsonl"\n'
        f'[[root]]\npath = "{models / "b"}"\nhistory = "h.jsonl"\n',
    )

    assert refused(path=file, environ={}) == (
        f"{file}: roots {models / 'a'} and {models / 'b'} share the history {tmp_path / 'h.jsonl'}"
    )


@pytest.mark.parametrize(
    ("environ", "flags", "name"),
    [({}, {"history": Path("h.jsonl")}, "--history"), ({"CKPT_WATCH_HISTORY": "h"}, {}, None)],
)
def test_one_history_for_several_roots(
    config_file: Path, environ: dict[str, str], flags: dict[str, Any], name: str | None
) -> None:
    """--history (or CKPT_WATCH_HISTORY) names one file: refused with several roots."""
    message = refused(path=config_file, environ=environ, flags=flags)

    assert message == (
        f"{name or 'CKPT_WATCH_HISTORY'} names one file but there are 2 roots; "
        "set history in each [[root]] table"
    )


def test_bad_notify_url_is_refused_without_showing_it(tmp_path: Path, models: Path) -> None:
    """A notify value is a secret: the error names the key, never the value."""
    file = write(
        tmp_path / "c.toml", f'notify = ["hunter2 oops"]\n[[root]]\npath = "{models / "a"}"\n'
    )

    message = refused(path=file, environ={})

    assert message == f"{file}: notify must be notification URLs like scheme://..."
    assert "hunter2" not in message


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        ("no-directory", "$CREDENTIALS_DIRECTORY is not set (the unit needs LoadCredential="),
        ("no-file", "cannot read"),
        ("bad-line", "line 2 is not a URL like scheme://..."),
    ],
)
def test_credential_problems(tmp_path: Path, models: Path, setup: str, expected: str) -> None:
    """A missing or bad credential is refused in one line that leaks nothing."""
    env = {"CKPT_WATCH_NOTIFY_CREDENTIAL": "notify"}
    if setup != "no-directory":
        env["CREDENTIALS_DIRECTORY"] = str(tmp_path)
    if setup == "bad-line":
        write(tmp_path / "notify", "json://127.0.0.1/x\nhunter2\n")

    message = refused(environ=env, roots=[models / "a"])

    assert message.startswith("notify_credential 'notify': ")
    assert expected in message
    assert "hunter2" not in message


# ----- config show ---------------------------------------------------------------------------


def test_mask_url_keeps_only_the_scheme() -> None:
    """What a URL says after its scheme is a secret."""
    assert mask_url("tgram://123:abc@/456") == "tgram://***"
    assert mask_url("not a url") == "***"


def show(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CKPT_WATCH_")}
    return subprocess.run(
        [sys.executable, "-m", "ckpt_watch", "config", "show", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**clean, **(env or {})},
    )


def test_config_show_prints_effective_settings_with_origins_and_masked_secrets(
    config_file: Path, models: Path
) -> None:
    """The output is TOML again, each value tagged with its source; URLs are masked."""
    done = show(
        "--config",
        str(config_file),
        env={"CKPT_WATCH_NOTIFY": "mailto://me:hunter2@127.0.0.1", "CKPT_WATCH_POLL": "5"},
    )

    assert done.returncode == 0, done.stderr
    assert "hunter2" not in done.stdout
    assert 'notify = ["mailto://***"]  # env CKPT_WATCH_NOTIFY' in done.stdout
    assert "poll = 5.0  # env CKPT_WATCH_POLL" in done.stdout
    assert f'path = "{models / "a"}"  # file [[root]] 1' in done.stdout
    assert 'metric = "eval_wer"  # file [[root]] 2' in done.stdout
    assert "# keep_top is not set" in done.stdout
    parsed = tomllib.loads(done.stdout)
    assert [root["reconcile"] for root in parsed["root"]] == [60.0, 120.0]


def test_config_show_refuses_bad_settings_with_exit_2(tmp_path: Path) -> None:
    """An invalid file is one line on stderr and exit status 2."""
    file = write(tmp_path / "c.toml", "keep = 0\n")

    done = show("--config", str(file))

    assert done.returncode == 2
    assert done.stderr == f"ckpt-watch: {file}: keep must be a whole number >= 1, not 0\n"
