"""Log lines: one per record, text or JSON, with secrets scrubbed in both."""

from __future__ import annotations

import json
import logging

import pytest

from ckpt_watch.logsetup import JsonFormatter, TextFormatter
from ckpt_watch.redact import protect


@pytest.mark.parametrize("formatter", [JsonFormatter(), TextFormatter()])
def test_a_traceback_holding_a_secret_is_scrubbed_in_every_format(
    formatter: logging.Formatter,
) -> None:
    """A secret in an exception's text never reaches a log line, JSON or text."""
    secret = "HeadSecretForLogs42"
    protect([f"json://user:{secret}@127.0.0.1:9/hook"])
    logger = logging.getLogger("ckpt_watch.test_logsetup")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger.addHandler(handler)
    try:
        try:
            raise RuntimeError(f"refused by target with token {secret}")
        except RuntimeError:
            logger.exception("delivery failed")
    finally:
        logger.removeHandler(handler)

    (record,) = records
    line = formatter.format(record)
    assert secret not in line
    if isinstance(formatter, JsonFormatter):
        assert "RuntimeError" in json.loads(line)["exc"]
