"""Log lines carry time, level and logger name, as text or (``LOG_FORMAT=json``) as one JSON object per
line. Each case configures logging from the settings in a subprocess (``django.setup()``), logs, and
reads its stderr."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROBE = """
import logging, django
django.setup()
log = logging.getLogger("tidewater.probe")
log.warning("refund for order %s", "A-17")
try:
    raise ValueError("bad input")
except ValueError:
    log.exception("ingestion failed")
"""


def run_probe(**environment: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings", **environment}
    return subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_json_log_lines_parse_with_time_level_logger_and_message():
    # given LOG_FORMAT=json
    before = datetime.now(timezone.utc)
    # when a process logs a warning and an exception
    result = run_probe(LOG_FORMAT="json")
    # then each record is one line holding one JSON object
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if "tidewater.probe" in line]
    records = [json.loads(line) for line in lines]
    assert len(records) == 2
    warning, error = records
    assert {key: warning[key] for key in ("level", "logger", "message")} == {
        "level": "WARNING", "logger": "tidewater.probe", "message": "refund for order A-17"}
    logged_at = datetime.fromisoformat(warning["time"])
    assert logged_at.tzinfo is not None and before - timedelta(seconds=1) <= logged_at <= datetime.now(timezone.utc)
    assert (error["level"], error["message"]) == ("ERROR", "ingestion failed")
    # and the traceback is inside the record, not on lines of its own
    assert error["exc_info"].startswith("Traceback (most recent call last):")
    assert error["exc_info"].endswith("ValueError: bad input")


def test_text_log_lines_have_time_level_and_logger_name():
    # given the default format; when a process logs a warning
    result = run_probe(LOG_FORMAT="text")
    # then the line reads "<date> <time> LEVEL logger message"
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stderr.splitlines() if "refund" in line)
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} WARNING tidewater\.probe refund for order A-17", line)


def test_an_unknown_log_format_stops_start_up_naming_the_variable():
    # given a misspelt format; when a process starts
    result = run_probe(LOG_FORMAT="jsonl")
    # then it stops with ImproperlyConfigured naming LOG_FORMAT
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "django.core.exceptions.ImproperlyConfigured: LOG_FORMAT must be one of text, json, not 'jsonl'")
