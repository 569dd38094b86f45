"""Notification targets: where they come from, how they are checked, how they are shown."""

from __future__ import annotations

from pathlib import Path

import pytest

from ckpt_watch.redact import mask, secrets_of
from ckpt_watch.targets import ENV, NotifyConfigError, load_targets, split_urls

HOOK = "json://127.0.0.1:8080/hooks/alpha-hook"
OTHER = "json://127.0.0.1:8080/hooks/bravo-hook"
MAIL = "mailto://me:Pw-4tR8q@127.0.0.1:2525?mode=insecure&from=ckpt@example.com&to=you@example.com"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", []),
        (f"{HOOK} {OTHER}", [HOOK, OTHER]),
        (f"{HOOK},{OTHER}", [HOOK, OTHER]),
        (f" {HOOK} ,\n{OTHER}, ", [HOOK, OTHER]),
        (
            "mailto://h?to=a@x.com,b@x.com,slack://T/B/C",
            ["mailto://h?to=a@x.com,b@x.com", "slack://T/B/C"],
        ),
    ],
)
def test_split_urls(text: str, expected: list[str]) -> None:
    """Spaces and commas separate URLs; a comma inside one URL's options does not."""
    assert split_urls(text) == expected


def test_environment_is_used_when_no_flag_names_a_target() -> None:
    """CKPT_WATCH_NOTIFY holds several URLs; --notify, when given, replaces it."""
    environ = {ENV: f"{HOOK}, {OTHER}"}

    assert load_targets([], environ=environ) == [HOOK, OTHER]
    assert load_targets([OTHER], environ=environ) == [OTHER]


def test_config_file_adds_its_targets(tmp_path: Path) -> None:
    """An apprise YAML or text config adds its URLs to the flags' (options given as keys too)."""
    yaml = tmp_path / "notify.yml"
    yaml.write_text(
        "urls:\n  - mailto://127.0.0.1:2525:\n    - to: you@example.com\n"
        "      user: me\n      pass: Pw-4tR8q\n      from: ckpt@example.com\n      mode: insecure\n"
    )
    text = tmp_path / "notify.txt"
    text.write_text(f"# targets\n{OTHER}\n")

    from_yaml = load_targets([HOOK], yaml, environ={})
    from_text = load_targets([], text, environ={})

    assert from_yaml[0] == HOOK and len(from_yaml) == 2
    assert mask(from_yaml[1]) == "mailto://me:****@127.0.0.1:2525/you%40example.com"
    assert [mask(url) for url in from_text] == [mask(OTHER)]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "No such file or directory"),
        (b"urls: [unclosed\n", "YAML"),
        (b"urls:\n  - bogus://me:Pw-4tR8q@host/x\n", "bogus://"),
        (b"# nothing here\n", "no notification URL"),
        (b"\xff\xfe json://x\n", "not UTF-8"),
        (b"include http://127.0.0.1:9/more.yml\n", "configuration"),
    ],
)
def test_bad_config_fails_in_one_line_naming_the_file(
    tmp_path: Path, content: bytes | None, message: str
) -> None:
    """A missing, unreadable, invalid or empty config stops start-up with one plain line."""
    path = tmp_path / "notify.yml"
    if content is not None:
        path.write_bytes(content)

    with pytest.raises(NotifyConfigError) as caught:
        load_targets([], path, environ={})

    text = str(caught.value)
    assert text.startswith(f"notify config {path}: ") and message in text
    assert "\n" not in text and "Pw-4tR8q" not in text


@pytest.mark.parametrize(
    "url",
    [
        "bogus://me:Pw-4tR8q@127.0.0.1/x",
        "mailto://me:Pw-4tR8q@127.0.0.1?from=not-an-address&to=you@example.com",
        "json://",
        "not a url",
    ],
)
def test_bad_url_fails_in_one_masked_line(url: str) -> None:
    """A URL apprise cannot use is named masked, with apprise's reason, and no password."""
    with pytest.raises(NotifyConfigError) as caught:
        load_targets([url], environ={})

    text = str(caught.value)
    assert text.startswith(f"notification URL {mask(url)} is not usable: ")
    assert "\n" not in text and "Pw-4tR8q" not in text


def test_same_target_twice_counts_once() -> None:
    """The same URL from a flag and the config file is one target, kept in first place."""
    assert load_targets([HOOK, OTHER, HOOK], environ={}) == [HOOK, OTHER]


def test_targets_that_mask_alike_are_refused() -> None:
    """Two targets the history could not tell apart stop start-up."""
    first = "json://127.0.0.1:8080/hook/a1234567z"
    second = "json://127.0.0.1:8080/hook/a7654321z"

    with pytest.raises(NotifyConfigError, match=r"show as .* once masked"):
        load_targets([first, second], environ={})


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (MAIL, "mailto://me:****@127.0.0.1:2525/you%40example.com"),
        (
            "json://bob:Pw-4tR8q@127.0.0.1:8080/hook/T0ken12345?+X-Key=Hdr98765",
            "json://bob:****@127.0.0.1:8080/***/T...5",
        ),
        ("slack://T1JJ3T3L2/A1BRTD4JD/TIiajkdnlazkcOXrIdevi7FQ", "slack://T...2/A...D/T...Q"),
        ("tgram://123456789:abcdefg_hijklmnop/1234", "tgram://1...p/1234"),
        ("bogus://me:Pw-4tR8q@127.0.0.1/x", "bogus://m...x"),
    ],
)
def test_mask_hides_secrets_and_keeps_the_service_recognisable(url: str, shown: str) -> None:
    """Passwords, tokens, webhook paths and headers are hidden; scheme and host stay."""
    assert mask(url) == shown


def test_webhook_secrets_include_path_headers_and_parameters() -> None:
    """A plain webhook's path, header values and parameter values are all treated as secret."""
    found = secrets_of(
        "json://bob:Pw-4tR8q@127.0.0.1:8080/hook/T0ken12345?+X-Key=Hdr98765&-k=P4ram99"
    )

    assert {"Pw-4tR8q", "T0ken12345", "Hdr98765", "P4ram99"} <= found
    assert "127.0.0.1" not in found and "bob" not in found
