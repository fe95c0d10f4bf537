"""The start-up banner of ``serve`` and ``dev`` shows whatever LOG_LEVEL says, in both log
formats: it is the line that says the engine is up and where."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from consumers.serve import _announce
from core.settings import load_settings
from core.telemetry import configure_logging

BANNER = "engine serving: kafka=127.0.0.1:9092 http=http://127.0.0.1:8000"


@pytest.fixture
def restored_logging() -> Iterator[None]:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        yield
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        logging.captureWarnings(False)


@pytest.mark.usefixtures("restored_logging")
def test_json_logs_at_warning_still_carry_the_banner_as_an_info_line() -> None:
    stream = io.StringIO()
    configure_logging("WARNING", "json", stream=stream)
    logging.getLogger("consumers.serve").info("chatter below the level")
    _announce(load_settings(log_format="json", log_level="WARNING", _env_file=None), BANNER)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(line["level"], line["logger"], line["message"]) for line in lines] == [
        ("INFO", "consumers.serve", BANNER)]


@pytest.mark.usefixtures("restored_logging")
def test_text_logs_at_warning_print_the_banner(capsys: pytest.CaptureFixture[str]) -> None:
    stream = io.StringIO()
    configure_logging("WARNING", "text", stream=stream)
    _announce(load_settings(log_format="text", log_level="WARNING", _env_file=None), BANNER)
    assert capsys.readouterr().out == BANNER + "\n"
    assert stream.getvalue() == ""
