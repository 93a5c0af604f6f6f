"""The demo page's server side: the `demo.send` action and the page's view."""

from typing import Any

import pytest
from django.test import AsyncClient

from tests.helpers import hello, recv, send

pytestmark = pytest.mark.django_db(transaction=True)


async def action(comm: Any, payload: dict[str, Any]) -> dict[str, Any]:
    await send(comm, {"type": "action", "id": "d1", "action": "demo.send", "payload": payload})
    return await recv(comm)


async def test_demo_send_delivers_the_text_to_the_named_session(ws: Any) -> None:
    alice, bob = await ws(), await ws()
    alice_id = (await hello(alice))["session_id"]
    bob_id = (await hello(bob))["session_id"]

    reply = await action(alice, {"to": bob_id, "text": "hi Bob"})
    assert reply == {"type": "reply", "id": "d1", "ok": True, "payload": {"to": bob_id, "seq": 1}}

    message = await recv(bob)
    assert message["type"] == "message"
    assert message["seq"] == 1
    assert message["message_type"] == "demo.message"
    assert message["payload"] == {"from": alice_id, "text": "hi Bob"}


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        ({"to": "s_nobody", "text": "hello?"}, "no_such_session"),
        ({"text": "to whom?"}, "bad_request"),
        ({"to": "s_x", "text": ""}, "bad_request"),
        ({"to": "s_x", "text": "x" * 501}, "bad_request"),
    ],
)
async def test_demo_send_refuses_unknown_sessions_and_bad_text(
    ws: Any, payload: dict[str, Any], code: str
) -> None:
    comm = await ws()
    await hello(comm)
    reply = await action(comm, payload)
    assert reply["ok"] is False
    assert reply["error"]["code"] == code


async def test_the_demo_page_is_served_with_the_client_module() -> None:
    response = await AsyncClient().get("/transport/demo/")
    assert response.status_code == 200
    assert b'from "/static/transport/client.js"' in response.content


async def test_transport_demo_false_turns_the_page_and_the_action_off(
    ws: Any, settings: Any
) -> None:
    settings.TRANSPORT_DEMO = False
    assert (await AsyncClient().get("/transport/demo/")).status_code == 404

    alice, bob = await ws(), await ws()
    await hello(alice)
    bob_id = (await hello(bob))["session_id"]
    reply = await action(alice, {"to": bob_id, "text": "hi"})
    assert reply["error"]["code"] == "demo_disabled"
