"""Deliver many messages to one session from several threads at once."""

import threading
import time
from typing import Any

from django.core.management.base import BaseCommand, CommandParser
from django.db import connection

from mailbox.api import deliver


class Command(BaseCommand):
    help = "Deliver COUNT messages from each of --writers threads, each on its own connection."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("session_id")
        parser.add_argument("count", type=int)
        parser.add_argument("--writers", type=int, default=1)
        parser.add_argument("--tag", default="w")
        parser.add_argument("--interval", type=float, default=0, help="seconds between two")

    def handle(self, *args: Any, **options: Any) -> None:
        start = threading.Barrier(options["writers"])
        failures: list[BaseException] = []

        def write(writer: int) -> None:
            # Django gives each thread its own connection; close it at the end.
            try:
                start.wait()
                for n in range(options["count"]):
                    payload = {"w": f"{options['tag']}{writer}", "n": n}
                    deliver(options["session_id"], "burst", payload)
                    time.sleep(options["interval"])
            except BaseException as exc:
                failures.append(exc)
            finally:
                connection.close()

        threads = [threading.Thread(target=write, args=(i,)) for i in range(options["writers"])]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if failures:
            raise failures[0]
