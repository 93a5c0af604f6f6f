"""Action claims and replies: group commits and the purge of old records."""

import asyncio
from datetime import timedelta

import pytest
from channels.db import database_sync_to_async
from django.db import DatabaseError
from django.utils import timezone

from tests.helpers import hello, recv, send
from transport import idempotency
from transport.idempotency import Claim
from transport.models import ActionRecord

pytestmark = pytest.mark.django_db(transaction=True)


async def test_concurrent_claims_each_win_once_and_duplicates_see_the_first():
    # Twenty claims queued at once go out in few batches; each id wins once.
    ids = [f"a{i}" for i in range(20)]
    first = await asyncio.gather(*(idempotency.aclaim("s_x", i, "echo") for i in ids))
    again = await asyncio.gather(*(idempotency.aclaim("s_x", i, "echo") for i in ids))

    assert [c.state for c in first] == [Claim.NEW] * 20
    assert [c.state for c in again] == [Claim.RUNNING] * 20


async def test_a_reply_stored_in_a_batch_answers_a_retry_claimed_in_the_same_batch():
    await idempotency.aclaim("s_x", "r1", "echo")
    reply = {"type": "reply", "id": "r1", "ok": True, "payload": {"n": 1}}

    # The reply and the retry's claim queue together: the reply goes first.
    idempotency.complete_later("s_x", "r1", reply)
    retry = await idempotency.aclaim("s_x", "r1", "echo")

    assert retry.state is Claim.DONE
    assert retry.reply == reply


async def test_a_reply_that_cannot_be_stored_is_logged_and_later_claims_still_go_out(
    monkeypatch, caplog
):
    real = idempotency._write_batch

    async def failing(claims, replies):
        if replies:
            raise DatabaseError("disk I/O error")
        return await real(claims, replies)

    monkeypatch.setattr(idempotency, "_write_batch", failing)
    idempotency.complete_later("s_x", "lost", {"type": "reply", "id": "lost", "ok": True})
    writes = idempotency._writes.get()
    assert writes.flusher is not None
    await writes.flusher

    assert "action replies not stored" in caplog.text
    assert (await idempotency.aclaim("s_x", "next", "echo")).state is Claim.NEW


async def test_records_older_than_the_dedupe_window_are_purged(settings):
    settings.TRANSPORT_DEDUPE_WINDOW = 60
    old = timezone.now() - timedelta(seconds=120)
    await database_sync_to_async(ActionRecord.objects.create)(
        session_id="s_x", action_id="old", action="echo", created_at=old
    )
    idempotency._last_purge = 0.0

    await idempotency.aclaim("s_x", "new", "echo")

    ids = await database_sync_to_async(
        lambda: sorted(ActionRecord.objects.values_list("action_id", flat=True))
    )()
    assert ids == ["new"]


async def test_a_repeated_reply_carries_the_id_as_the_retry_spelled_it(ws):
    comm = await ws()
    await hello(comm)
    await send(comm, {"type": "action", "id": 7, "action": "echo", "payload": {"n": 1}})
    first = await recv(comm)

    await send(comm, {"type": "action", "id": "7", "action": "echo", "payload": {"n": 2}})
    again = await recv(comm)

    assert first["id"] == 7
    assert again == {**first, "id": "7"}


def _run_each(statements: list[tuple[str, list[object]]]) -> list[int]:
    from django.db import connection

    with connection.cursor() as cursor:
        return idempotency._execute_each(cursor, statements)


async def test_a_failing_claim_statement_raises_djangos_database_error():
    # REST answers Django's DatabaseError with a 503; a driver's own error
    # would be a 500.
    with pytest.raises(DatabaseError, match="no_such_table"):
        await database_sync_to_async(_run_each)([("SELECT * FROM no_such_table", [])])


class _WithoutFastPath:
    """A Django cursor whose DB-API cursor is not one of the project's engines'."""

    def __init__(self, cursor: object) -> None:
        self.wrapped = cursor
        self.cursor = object()

    def execute(self, sql: str, params: list[object]) -> None:
        self.wrapped.execute(sql, params)  # type: ignore[attr-defined]

    @property
    def rowcount(self) -> int:
        return int(self.wrapped.rowcount)  # type: ignore[attr-defined]


def _claims_both_ways() -> tuple[list[int], list[int]]:
    from django.db import connection

    def statements(prefix: str) -> list[tuple[str, list[object]]]:
        now = timezone.now()
        claim = idempotency._CLAIM_SQL
        return [
            (claim, ["s_x", f"{prefix}1", "echo", now]),
            (claim, ["s_x", f"{prefix}1", "echo", now]),
            (claim, ["s_x", f"{prefix}2", "echo", now]),
        ]

    with connection.cursor() as cursor:
        fast = idempotency._execute_each(cursor, statements("fast-"))
        plain = idempotency._execute_each(_WithoutFastPath(cursor), statements("plain-"))
    return fast, plain


async def test_claim_statements_count_the_same_with_or_without_the_engines_fast_path():
    fast, plain = await database_sync_to_async(_claims_both_ways)()

    # The repeated id's INSERT does nothing.
    assert fast == plain == [1, 0, 1]
