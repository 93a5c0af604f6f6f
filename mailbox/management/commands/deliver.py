"""Deliver one message to a session's mailbox from the shell."""

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from mailbox.api import deliver
from mailbox.errors import MailboxError


class Command(BaseCommand):
    help = (
        "Queue a message for a session, as mailbox.api.deliver() does. "
        "Example: manage.py deliver s_abc order.shipped '{\"order\": 42}'"
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("session_id")
        parser.add_argument("message_type")
        parser.add_argument("payload", help="a JSON value")
        parser.add_argument("--ttl", type=int, default=None, help="lifetime in seconds")
        parser.add_argument(
            "--ephemeral",
            action="store_true",
            help="deliver only if the session is connected now",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            payload = json.loads(options["payload"])
        except json.JSONDecodeError as exc:
            raise CommandError(f"payload is not JSON: {exc}") from exc

        try:
            seq = deliver(
                options["session_id"],
                options["message_type"],
                payload,
                durable=not options["ephemeral"],
                ttl=options["ttl"],
            )
        except MailboxError as exc:
            raise CommandError(str(exc)) from exc

        if seq is None:
            raise CommandError("message dropped (mailbox full or session not connected)")
        self.stdout.write(f"delivered seq={seq} to {options['session_id']}")
