"""Settings read from the environment (``config.environment.Env``): floats in scientific notation
keep their exponent, which django-environ's own parser drops (issue #664 there)."""

from __future__ import annotations

import pytest
from django.core.exceptions import ImproperlyConfigured

from config.environment import Env


@pytest.mark.parametrize("raw, value", [("5e-5", 5e-5), ("1e3", 1000.0), ("-2.5E+2", -250.0), (" 0.62 ", 0.62),
                                        ("3", 3.0)])
def test_a_float_setting_reads_the_number_written(monkeypatch, raw, value):
    monkeypatch.setenv("TEST_FLOAT_SETTING", raw)
    assert Env().float("TEST_FLOAT_SETTING") == pytest.approx(value)
    # as settings read it, with a float default (django-environ then casts by the default's type)
    assert Env().float("TEST_FLOAT_SETTING", default=2e-5) == pytest.approx(value)


def test_an_unset_float_setting_takes_its_default_and_a_word_is_refused_by_name(monkeypatch):
    monkeypatch.delenv("TEST_FLOAT_SETTING", raising=False)
    assert Env().float("TEST_FLOAT_SETTING", default=0.25) == 0.25
    monkeypatch.setenv("TEST_FLOAT_SETTING", "fast")
    with pytest.raises(ImproperlyConfigured, match="TEST_FLOAT_SETTING='fast' is not a number"):
        Env().float("TEST_FLOAT_SETTING")
