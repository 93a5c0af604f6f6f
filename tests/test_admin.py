"""The admin of mailboxes and messages: lists, filters, overview, repair actions, permissions."""

from datetime import timedelta
from typing import Any

import pytest
from django.contrib.admin.utils import quote
from django.contrib.auth.models import Permission, User
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from mailbox import expiry, store
from mailbox.models import Mailbox, Message

pytestmark = pytest.mark.django_db

CHANGELIST = "/admin/mailbox/mailbox/"
OVERVIEW = "/admin/mailbox/mailbox/overview/"


def session_with(n: int, acked: int = 0) -> str:
    """Create a session holding `n` messages, the first `acked` acknowledged."""
    session_id = store.create_session().session_id
    for i in range(n):
        store.deliver(session_id, "order.shipped", {"order": i, "note": "größer"})
    if acked:
        store.ack(session_id, acked)
    return session_id


def act(client: Client, action: str, *session_ids: str, **fields: Any) -> Any:
    data = {"action": action, "_selected_action": list(session_ids), **fields}
    return client.post(CHANGELIST, data, follow=True)


@pytest.fixture
def admin_client(client: Client) -> Client:
    """Log in a superuser (without a password: hashing one costs seconds per test)."""
    client.force_login(User.objects.create_superuser("admin", password=None))
    return client


@pytest.fixture
def viewer(client: Client) -> Client:
    """Log in a staff member who may view mailboxes and messages, and change nothing."""
    user = User.objects.create_user("viewer", password=None, is_staff=True)
    user.user_permissions.set(
        Permission.objects.filter(codename__in=["view_mailbox", "view_message"])
    )
    client.force_login(user)
    return client


def test_the_admin_index_links_the_overview(admin_client):
    page = admin_client.get("/admin/")

    assert page.status_code == 200
    assert OVERVIEW in page.content.decode()


def test_a_page_of_100_mailboxes_costs_a_fixed_number_of_queries(
    admin_client, django_assert_max_num_queries
):
    # 100 mailboxes, each with queued and acknowledged messages to annotate.
    now = timezone.now()
    Mailbox.objects.bulk_create(
        Mailbox(
            session_id=f"s_{i:03d}",
            created_at=now,
            last_seen_at=now,
            expires_at=now + timedelta(days=1),
            last_seq=3,
            queued=2,
            high_water=3,
        )
        for i in range(120)
    )
    Message.objects.bulk_create(
        Message(
            mailbox_id=f"s_{i:03d}",
            seq=seq,
            message_type="t",
            payload={},
            sent_at=now - timedelta(minutes=seq),
            expires_at=now + timedelta(days=1),
            acked_at=now if seq == 1 else None,
        )
        for i in range(120)
        for seq in (1, 2, 3)
    )

    # Session, user, the two counts and the page itself: none per row.
    with django_assert_max_num_queries(6):
        page = admin_client.get(CHANGELIST + "?o=5")

    assert page.status_code == 200
    assert page.content.decode().count('class="action-select"') == 100
    assert page.content.decode().count(">2 min<") == 100


def test_it_filters_mailboxes_by_transport_backlog_expiry_and_session(admin_client):
    idle = session_with(2)
    polling = session_with(0)
    store.rest_seen(polling, timezone.now() + timedelta(seconds=30))
    ended = session_with(1)
    Mailbox.objects.filter(pk=ended).update(expires_at=timezone.now() - timedelta(seconds=1))

    def listed(query: str) -> set[str]:
        page = admin_client.get(CHANGELIST + query)
        assert page.status_code == 200
        return {s for s in (idle, polling, ended) if s in page.content.decode()}

    assert listed("?transport=rest") == {polling}
    assert listed("?transport=mailbox") == {idle, ended}
    assert listed("?backlog=yes") == {idle, ended}
    assert listed("?backlog=no") == {polling}
    assert listed("?expired=yes") == {ended}
    assert listed(f"?q={idle[2:10]}") == {idle}


def test_the_overview_shows_transports_queues_drops_and_the_worst_mailboxes(admin_client):
    deep = session_with(5)
    old = session_with(2)
    Message.objects.filter(mailbox_id=old).update(sent_at=timezone.now() - timedelta(hours=3))
    store.rest_seen(old, timezone.now() + timedelta(seconds=30))

    page = admin_client.get(OVERVIEW)

    assert page.status_code == 200
    context = page.context
    assert dict(context["by_transport"]) == {"ws": 0, "rest": 1, "mailbox": 1}
    assert context["queued"] == 7
    assert [box.session_id for box in context["deepest"]] == [deep, old]
    assert [box.session_id for box in context["oldest"]] == [old, deep]
    assert context["oldest"][0].age == "3 h 0 min"
    assert {reason for reason, _ in context["drops"]} == {"ttl", "overflow", "transport-closed"}
    html = page.content.decode()
    assert "<svg" in html and "Mailboxes by queue depth" in html


@pytest.mark.django_db(transaction=True)
def test_the_overview_reads_the_drop_counter_of_this_process(admin_client):
    from prometheus_client import REGISTRY

    before = REGISTRY.get_sample_value("transport_mailbox_drop_total", {"reason": "overflow"})
    if before is None:
        pytest.skip("the drop counter is not registered in this process")
    session_id = session_with(0)
    with pytest.MonkeyPatch.context() as patch:
        from django.conf import settings

        patch.setattr(settings, "TRANSPORT_MAILBOX_CAPACITY", 1)
        store.deliver(session_id, "t", {})
        store.deliver(session_id, "t", {})

    drops = dict(admin_client.get(OVERVIEW).context["drops"])

    assert drops["overflow"] == before + 1


@pytest.mark.django_db(transaction=True)
def test_expire_now_lets_the_next_sweep_drop_the_messages_as_ttl(admin_client):
    target = session_with(3, acked=1)
    other = session_with(2)

    page = act(admin_client, "expire_now", target)

    assert "2 queued messages in 1 mailboxes now expire" in page.content.decode()
    result = expiry.sweep()
    assert (result.ttl, result.acked) == (2, 1)
    assert Mailbox.objects.get(pk=target).queued == 0
    assert Mailbox.objects.get(pk=other).queued == 2


def test_purge_acknowledged_deletes_only_delivered_messages(admin_client):
    target = session_with(4, acked=3)

    page = act(admin_client, "purge_acknowledged", target)

    assert "Purged 3 acknowledged messages from 1 mailboxes" in page.content.decode()
    assert list(Message.objects.filter(mailbox_id=target).values_list("seq", flat=True)) == [4]
    assert Mailbox.objects.get(pk=target).queued == 1


def test_redeliver_from_seq_queues_acknowledged_messages_again(admin_client):
    target = session_with(5, acked=5)

    page = act(admin_client, "redeliver_from_seq", target, seq="3")

    assert "Queued 3 messages from seq 3 again" in page.content.decode()
    box = Mailbox.objects.get(pk=target)
    assert (box.queued, box.acked_seq, box.high_water) == (3, 2, 3)
    # A client resuming from the server's cursor gets them, in order.
    batch = store.read(target, box.acked_seq, 10, "mailbox")
    assert [m.seq for m in batch.messages] == [3, 4, 5]


def test_redeliver_without_a_seq_changes_nothing_and_says_why(admin_client):
    target = session_with(2, acked=2)

    page = act(admin_client, "redeliver_from_seq", target, seq="")

    assert "Redeliver needs a positive seq" in page.content.decode()
    assert Mailbox.objects.get(pk=target).queued == 0


def test_staff_without_change_permission_see_everything_and_change_nothing(viewer):
    target = session_with(3, acked=2)
    # Quoted as the admin quotes it: a session id may hold `_25`, its escape of `%`.
    change = reverse("admin:mailbox_mailbox_change", args=[quote(target)])
    message = Message.objects.get(mailbox_id=target, seq=3)
    before = list(Message.objects.order_by("pk").values())

    assert viewer.get(CHANGELIST).status_code == 200
    assert viewer.get(OVERVIEW).status_code == 200
    assert viewer.get(change).status_code == 200
    assert (
        viewer.get(reverse("admin:mailbox_message_change", args=[message.pk])).status_code == 200
    )
    assert "expire_now" not in viewer.get(CHANGELIST).content.decode()

    for action in ("expire_now", "purge_acknowledged", "redeliver_from_seq"):
        act(viewer, action, target, seq="1")
    viewer.post(change, {"queued": "0"})

    assert list(Message.objects.order_by("pk").values()) == before
    assert Mailbox.objects.get(pk=target).queued == 1


def test_staff_without_view_permission_cannot_open_the_overview(client):
    user = User.objects.create_user("nobody", password=None, is_staff=True)
    client.force_login(user)

    assert client.get(OVERVIEW).status_code == 403


def test_a_message_shows_its_payload_as_formatted_read_only_json(admin_client):
    target = session_with(1)
    message = Message.objects.get(mailbox_id=target)

    page = admin_client.get(reverse("admin:mailbox_message_change", args=[message.pk]))

    html = page.content.decode()
    assert '<pre class="payload">{\n  &quot;note&quot;: &quot;größer&quot;,' in html
    assert 'name="payload"' not in html


def test_the_message_list_filters_and_searches_by_session(admin_client):
    target = session_with(2, acked=1)
    session_with(1)

    page = admin_client.get(f"/admin/mailbox/message/?q={target}&acked=no")

    assert page.status_code == 200
    assert page.context["cl"].result_count == 1
