from django.apps import AppConfig


class MailboxConfig(AppConfig):
    name = "mailbox"
    verbose_name = "Mailboxes"
    default_auto_field = "django.db.models.BigAutoField"
