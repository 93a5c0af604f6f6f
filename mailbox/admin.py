"""The admin of mailboxes and messages: inspect queues, repair them, see the overview.

Everything is read-only in forms: a hand-edited counter would break the
invariants Mailbox documents. Repairs go through the actions, each behind
the change permission, each one locked transaction in mailbox.repair.
"""

import json
from collections.abc import Callable
from datetime import datetime
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.helpers import ActionForm
from django.core.exceptions import PermissionDenied
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils import timezone
from django.utils.html import format_html

from mailbox import overview, repair, store
from mailbox.models import Mailbox, Message

# The admin index links the overview page from a box above the app list.
admin.site.index_template = "admin/mailbox_index.html"


class TransportFilter(admin.SimpleListFilter):
    title = "transport"
    parameter_name = "transport"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("ws", "WebSocket"), ("rest", "REST long-poll"), ("mailbox", "mailbox only")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        value = self.value()
        if value not in overview.TRANSPORTS:
            return queryset
        return queryset.filter(overview.transport_q(str(value), timezone.now()))


class YesNoFilter(admin.SimpleListFilter):
    """A yes/no filter; subclasses give the condition of `yes`."""

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("yes", "Yes"), ("no", "No")]

    def condition(self) -> dict[str, Any]:
        raise NotImplementedError

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        if self.value() == "yes":
            return queryset.filter(**self.condition())
        if self.value() == "no":
            return queryset.exclude(**self.condition())
        return queryset


class BacklogFilter(YesNoFilter):
    title = "has backlog"
    parameter_name = "backlog"

    def condition(self) -> dict[str, Any]:
        return {"queued__gt": 0}


class ExpiredFilter(YesNoFilter):
    title = "expired"
    parameter_name = "expired"

    def condition(self) -> dict[str, Any]:
        return {"expires_at__lte": timezone.now()}


class AcknowledgedFilter(YesNoFilter):
    title = "acknowledged"
    parameter_name = "acked"

    def condition(self) -> dict[str, Any]:
        return {"acked_at__isnull": False}


class RepairForm(ActionForm):
    """The action bar, with the seq that `redeliver from seq` needs."""

    seq = forms.IntegerField(required=False, min_value=1, label="from seq")


def _repair(
    request: HttpRequest,
    boxes: QuerySet[Mailbox],
    apply: Callable[[str], int],
    done: str,
) -> None:
    """Apply one repair to each selected mailbox, each in its own transaction."""
    total = sum(apply(session_id) for session_id in boxes.values_list("pk", flat=True))
    messages.success(request, done.format(count=total, boxes=boxes.count()))


@admin.register(Mailbox)
class MailboxAdmin(admin.ModelAdmin):
    list_display = (
        "session_id",
        "transport",
        "queued",
        "high_water",
        "oldest_queued",
        "last_seen_at",
        "expires_at",
    )
    list_filter = (TransportFilter, BacklogFilter, ExpiredFilter)
    search_fields = ("session_id",)
    ordering = ("-queued", "session_id")
    sortable_by = ("session_id", "queued", "high_water", "oldest_queued", "last_seen_at")
    list_per_page = 100
    action_form = RepairForm
    actions = ("expire_now", "purge_acknowledged", "redeliver_from_seq")
    fields = (
        "session_id",
        "transport",
        "messages_link",
        ("last_seq", "acked_seq", "lost_seq"),
        ("queued", "high_water", "oldest_queued"),
        ("created_at", "last_seen_at", "expires_at"),
        ("ws_connections", "ws_until", "rest_until"),
    )
    readonly_fields = fields[:3] + (
        "last_seq",
        "acked_seq",
        "lost_seq",
        "queued",
        "high_water",
        "oldest_queued",
        "created_at",
        "last_seen_at",
        "expires_at",
        "ws_connections",
        "ws_until",
        "rest_until",
    )

    def get_queryset(self, request: HttpRequest) -> QuerySet[Mailbox]:
        return overview.with_oldest(super().get_queryset(request))

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # Deleting a row would drop its messages uncounted; expiry removes sessions.
        return False

    @admin.display(description="transport")
    def transport(self, box: Mailbox) -> str:
        return store.transport_of(box, timezone.now())

    @admin.display(description="oldest queued", ordering="oldest_sent")
    def oldest_queued(self, box: Mailbox) -> str:
        oldest: datetime | None = getattr(box, "oldest_sent", None)
        return overview.age(oldest, timezone.now())

    @admin.display(description="messages")
    def messages_link(self, box: Mailbox) -> str:
        url = reverse("admin:mailbox_message_changelist") + f"?mailbox__session_id={box.pk}"
        return format_html('<a href="{}">{} queued, all messages</a>', url, box.queued)

    @admin.action(description="Expire now (next sweep drops them as ttl)", permissions=["change"])
    def expire_now(self, request: HttpRequest, boxes: QuerySet[Mailbox]) -> None:
        done = "{count} queued messages in {boxes} mailboxes now expire at the next sweep."
        _repair(request, boxes, repair.expire_now, done)

    @admin.action(description="Purge acknowledged messages", permissions=["change"])
    def purge_acknowledged(self, request: HttpRequest, boxes: QuerySet[Mailbox]) -> None:
        done = "Purged {count} acknowledged messages from {boxes} mailboxes."
        _repair(request, boxes, repair.purge_acknowledged, done)

    @admin.action(description="Redeliver from seq (give the seq)", permissions=["change"])
    def redeliver_from_seq(self, request: HttpRequest, boxes: QuerySet[Mailbox]) -> None:
        # The admin validated the action bar without this field; check it here.
        try:
            seq = int(RepairForm.base_fields["seq"].clean(request.POST.get("seq")))
        except (forms.ValidationError, TypeError):
            messages.error(request, "Redeliver needs a positive seq in the “from seq” box.")
            return
        done = f"Queued {{count}} messages from seq {seq} again in {{boxes}} mailboxes."
        _repair(request, boxes, lambda session_id: repair.redeliver_from(session_id, seq), done)

    def get_urls(self) -> list[URLPattern]:
        view = self.admin_site.admin_view(self.overview_view)
        extra = [path("overview/", view, name="mailbox_mailbox_overview")]
        return extra + super().get_urls()

    def overview_view(self, request: HttpRequest) -> HttpResponse:
        """Show sessions by transport, queue depths, drops and the worst mailboxes."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        context = {
            **self.admin_site.each_context(request),
            **overview.overview(),
            "title": "Mailbox overview",
            "opts": self.model._meta,
        }
        return TemplateResponse(request, "admin/mailbox/overview.html", context)


@admin.register(Message)
class MessageAdmin(admin.ModelAdmin):
    list_display = (
        "session",
        "seq",
        "message_type",
        "source",
        "durable",
        "sent_at",
        "expires_at",
        "acked_at",
    )
    list_filter = ("durable", "source", AcknowledgedFilter, ExpiredFilter)
    search_fields = ("=mailbox__session_id", "^message_type")
    ordering = ("-pk",)
    list_per_page = 100
    # A COUNT(*) over millions of rows on every page is slow; the pager
    # still counts the filtered rows.
    show_full_result_count = False
    fields = (
        "session",
        "seq",
        "message_type",
        "source",
        "durable",
        ("sent_at", "expires_at", "acked_at"),
        "formatted_payload",
    )
    readonly_fields = (
        "session",
        "seq",
        "message_type",
        "source",
        "durable",
        "sent_at",
        "expires_at",
        "acked_at",
        "formatted_payload",
    )

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # A deleted row would leave its mailbox's `queued` counting it.
        return False

    @admin.display(description="session", ordering="mailbox")
    def session(self, message: Message) -> str:
        url = reverse("admin:mailbox_mailbox_change", args=[message.mailbox_id])
        return format_html('<a href="{}">{}</a>', url, message.mailbox_id)

    @admin.display(description="payload")
    def formatted_payload(self, message: Message) -> str:
        text = json.dumps(message.payload, indent=2, sort_keys=True, ensure_ascii=False)
        return format_html('<pre class="payload">{}</pre>', text)
