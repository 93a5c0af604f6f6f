"""The WebSocket conversation from hello to a pushed message, in-process."""

import pytest
from asgiref.sync import sync_to_async

from mailbox.api import deliver
from tests.helpers import hello, recv, send

pytestmark = pytest.mark.django_db(transaction=True)


async def test_it_welcomes_a_new_session_and_answers_echo(ws):
    comm = await ws()
    welcome = await hello(comm)
    assert welcome["resumed"] is False
    assert welcome["session_id"].startswith("s_")
    assert welcome["next_seq"] == 1

    await send(comm, {"type": "action", "id": "a1", "action": "echo", "payload": {"x": 1}})
    assert await recv(comm) == {"type": "reply", "id": "a1", "ok": True, "payload": {"x": 1}}


async def test_it_pushes_a_delivered_message(ws):
    comm = await ws()
    welcome = await hello(comm)

    seq = await sync_to_async(deliver)(welcome["session_id"], "order.shipped", {"order": 42})

    message = await recv(comm)
    assert message["type"] == "message"
    assert message["seq"] == seq == 1
    assert message["message_type"] == "order.shipped"
    assert message["payload"] == {"order": 42}
    assert message["sent_at"].endswith("Z")
