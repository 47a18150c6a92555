"""Race-free activation: two promotions, or a promotion and a rollback, committing at once on real
Postgres leave exactly one active model version and raise nothing.

The race is forced, not hoped for: the first activation is held right after its first UPDATE of
``chat_modelversion`` (a Django ``execute_wrapper`` on its own connection) until the second one is
seen waiting for a lock in ``pg_stat_activity``; then the first commits. Without serialisation the
second one's deactivation skips the row the first just activated, and its activation breaks the
one-active constraint (IntegrityError)."""

from __future__ import annotations

import hashlib
import threading
import time

import pytest
from django.db import connection, connections

from chat.models import ModelVersion
from chat.services import model_version_activate
from tuning.fine_tuning import model_version_rollback

pytestmark = [pytest.mark.django_db(transaction=True)]


def version(tmp_path, name, content: bytes, *, active=False) -> ModelVersion:
    base = tmp_path / "base.gguf"
    if not base.exists():
        base.write_bytes(b"GGUF base")
    adapter = tmp_path / f"{name}.gguf"
    adapter.write_bytes(content)
    return ModelVersion.objects.create(
        name=name, base_model_path=str(base), base_model_sha256=hashlib.sha256(b"GGUF base").hexdigest(),
        adapter_path=str(adapter), adapter_sha256=hashlib.sha256(content).hexdigest(), is_active=active)


def waiting_for_a_lock() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                       "AND wait_event_type = 'Lock'")
        return cursor.fetchone()[0]


OPERATIONS = {
    "promote": lambda v: model_version_activate(v),
    "rollback": lambda v: model_version_rollback(v.pk),
}


@pytest.mark.parametrize("first,second", [("promote", "promote"), ("promote", "rollback"), ("rollback", "promote")])
def test_two_activations_at_once_leave_exactly_one_active_version(tmp_path, first, second):
    # given an active version and two others
    version(tmp_path, "serving", b"GGUF adapter 0", active=True)
    one, two = version(tmp_path, "one", b"GGUF adapter 1"), version(tmp_path, "two", b"GGUF adapter 2")
    paused, go = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def hold_after_first_update(execute, sql, params, many, context):
        result = execute(sql, params, many, context)
        if sql.startswith('UPDATE "chat_modelversion"') and not paused.is_set():
            paused.set()
            go.wait(60)
        return result

    def run(operation, target, wrapper=None):
        try:
            if wrapper:
                with connections["default"].execute_wrapper(wrapper):
                    OPERATIONS[operation](target)
            else:
                OPERATIONS[operation](target)
        except BaseException as error:  # reported to the test below
            errors.append(error)
        finally:
            connections["default"].close()

    # when the first activation is held inside its transaction and the second one starts meanwhile
    first_thread = threading.Thread(target=run, args=(first, one, hold_after_first_update))
    first_thread.start()
    assert paused.wait(60), "the first activation never wrote"
    second_thread = threading.Thread(target=run, args=(second, two))
    second_thread.start()
    deadline = time.monotonic() + 60
    while not waiting_for_a_lock() and time.monotonic() < deadline and second_thread.is_alive():
        time.sleep(0.05)
    blocked = bool(waiting_for_a_lock())
    go.set()
    first_thread.join(60)
    second_thread.join(60)
    # then the second one waited for the first, both succeeded, and the later one is the only active
    assert blocked, "the second activation did not wait for the first"
    assert errors == []
    assert list(ModelVersion.objects.filter(is_active=True).values_list("name", flat=True)) == ["two"]
