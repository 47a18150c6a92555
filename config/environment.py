"""Reading settings from the environment: django-environ's ``Env`` with one parser mended."""

from __future__ import annotations

import environ
from django.core.exceptions import ImproperlyConfigured


class Env(environ.Env):
    """django-environ's ``Env`` with floats read by Python's ``float``: its own parser drops the
    exponent marker, so ``1e3`` became 13.0 and ``5e-5`` (a learning rate) stopped start-up with
    "could not convert string to float: '5-5'" (django-environ issue #664, open). Raises
    ``ImproperlyConfigured`` naming the variable for a value that is not a number."""

    def float(self, var, default=environ.Env.NOTSET):
        value = self.get_value(var, cast=str, default=default)  # a float default would pick the broken parser
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        try:
            return float(str(value).strip())
        except ValueError:
            raise ImproperlyConfigured(f"{var}={value!r} is not a number") from None
