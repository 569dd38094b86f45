"""The sd_notify protocol: addresses, messages, failures, and WATCHDOG_USEC/WATCHDOG_PID."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from notify_listener import NotifyListener

from ckpt_watch.sdnotify import (
    Notifier,
    NotifyAddressError,
    WatchdogSettingError,
    socket_address,
    watchdog_interval,
    watchdog_usec,
)


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[NotifyListener]:
    receiver = NotifyListener(tmp_path)
    yield receiver
    receiver.close()


def test_messages_reach_a_socket_bound_at_a_path(listener: NotifyListener) -> None:
    """Each call is one datagram of KEY=value lines at the NOTIFY_SOCKET path."""
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": listener.address})

    assert notifier.ready("watching 2 runs")
    assert notifier.watchdog()
    assert notifier.extend_timeout(20)
    assert notifier.stopping()
    notifier.close()

    received = [listener.receive(2) for _ in range(4)]
    assert received == [
        {"READY": "1", "STATUS": "watching 2 runs"},
        {"WATCHDOG": "1"},
        {"EXTEND_TIMEOUT_USEC": "20000000"},
        {"STOPPING": "1"},
    ]


def test_abstract_socket_name_with_at_sign() -> None:
    """An @name NOTIFY_SOCKET is a socket in the abstract namespace."""
    listener = NotifyListener(abstract=True)
    try:
        notifier = Notifier(listener.address)

        assert notifier.status("scanning")
        assert listener.receive(2) == {"STATUS": "scanning"}
    finally:
        listener.close()


def test_status_is_always_one_line(listener: NotifyListener) -> None:
    """A STATUS text with newlines would split into bogus assignments: it is flattened."""
    notifier = Notifier(listener.address)

    notifier.status("two\nlines\tand  spaces")

    assert listener.receive(2) == {"STATUS": "two lines and spaces"}


def test_outside_systemd_nothing_is_sent_and_nothing_fails() -> None:
    """Without NOTIFY_SOCKET every call is a quiet no-op."""
    notifier = Notifier.from_environment({})

    assert not notifier.enabled
    assert not notifier.ready("x")
    assert not notifier.watchdog()
    assert not notifier.stopping()
    notifier.close()


@pytest.mark.parametrize("value", ["relative/path", "@", "/", "x", "/" + "a" * 200])
def test_unusable_address_is_refused(value: str) -> None:
    """NOTIFY_SOCKET must be an absolute path or @name that fits in sun_path."""
    with pytest.raises(NotifyAddressError):
        socket_address(value)


def test_unusable_address_turns_notifications_off_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A bad NOTIFY_SOCKET is logged once; sending then does nothing and raises nothing."""
    with caplog.at_level(logging.WARNING):
        notifier = Notifier("relative.sock")

    assert not notifier.enabled
    assert not notifier.watchdog()
    assert [r.getMessage() for r in caplog.records] == [
        "service notifications off: NOTIFY_SOCKET='relative.sock' is not an absolute path or @name"
    ]


def test_send_failure_is_logged_once_and_never_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A socket that is gone makes sends fail quietly, with one warning per outage."""
    listener = NotifyListener(tmp_path)
    notifier = Notifier(listener.address)
    listener.close()
    os.unlink(listener.address)

    with caplog.at_level(logging.INFO):
        results = [notifier.watchdog() for _ in range(3)]
        listener = NotifyListener(tmp_path)
        recovered = notifier.watchdog()
    listener.close()

    assert results == [False, False, False]
    assert recovered
    messages = [r.getMessage() for r in caplog.records]
    assert len([m for m in messages if m.startswith("cannot notify")]) == 1
    assert any(m.startswith("service manager reachable again") for m in messages)


# ----- WATCHDOG_USEC and WATCHDOG_PID, as sd_watchdog_enabled reads them --------------------


@pytest.mark.parametrize(
    ("text", "usec"),
    [
        ("30000000", 30_000_000),
        ("  500", 500),
        ("+500", 500),
        ("0x10", 16),
        ("010", 8),
        ("0o10", 8),
        ("0b101", 5),
        (str(2**64 - 2), 2**64 - 2),
    ],
)
def test_watchdog_usec_parses_like_libsystemd(text: str, usec: int) -> None:
    """Decimal, hex, octal and binary forms, blanks and a plus sign, as safe_atou64 takes them."""
    assert watchdog_usec({"WATCHDOG_USEC": text}) == usec


@pytest.mark.parametrize(
    "text",
    ["", "abc", "12abc", "1.5", "-1", "-0", "0", str(2**64 - 1), str(2**64), "0x", "0b2", "5 "],
)
def test_watchdog_usec_refused_where_libsystemd_returns_an_error(text: str) -> None:
    """Garbage, trailing text, negatives, zero, infinity and overflow are errors."""
    with pytest.raises(WatchdogSettingError):
        watchdog_usec({"WATCHDOG_USEC": text})


def test_watchdog_off_without_watchdog_usec() -> None:
    """No WATCHDOG_USEC: no watchdog, even with a WATCHDOG_PID."""
    assert watchdog_usec({"WATCHDOG_PID": str(os.getpid())}) is None


def test_watchdog_pid_must_name_this_process() -> None:
    """A WATCHDOG_PID of another process turns the watchdog off; ours or none keeps it on."""
    usec = "2000000"

    assert watchdog_usec({"WATCHDOG_USEC": usec, "WATCHDOG_PID": str(os.getpid())}) == 2_000_000
    assert watchdog_usec({"WATCHDOG_USEC": usec, "WATCHDOG_PID": "1"}, pid=4242) is None
    assert watchdog_usec({"WATCHDOG_USEC": usec, "WATCHDOG_PID": "4242"}, pid=4242) == 2_000_000
    assert watchdog_usec({"WATCHDOG_USEC": usec}) == 2_000_000


@pytest.mark.parametrize("pid", ["0", "-5", "x", "", str(2**31), str(2**64)])
def test_bad_watchdog_pid_is_an_error(pid: str) -> None:
    """A WATCHDOG_PID that is no valid process id is an error, as in parse_pid."""
    with pytest.raises(WatchdogSettingError):
        watchdog_usec({"WATCHDOG_USEC": "1000", "WATCHDOG_PID": pid})


def test_watchdog_interval_is_half_the_timeout() -> None:
    """Pings go out at half of WATCHDOG_USEC, in seconds."""
    assert watchdog_interval({"WATCHDOG_USEC": "3000000"}) == 1.5
    assert watchdog_interval({}) is None


def test_watchdog_interval_with_a_bad_setting_is_off_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An unusable WATCHDOG_USEC means no pings and one warning, never a crash."""
    with caplog.at_level(logging.WARNING):
        assert watchdog_interval({"WATCHDOG_USEC": "soon"}) is None

    assert "WATCHDOG_USEC='soon'" in caplog.text
