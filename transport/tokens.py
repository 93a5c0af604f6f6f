"""Session tokens: the session id, signed with a timestamp.

A token proves which session it was issued for, and stops working after
TRANSPORT_TOKEN_MAX_AGE; the session it names must also still be alive.
"""

from django.conf import settings
from django.core import signing

from transport.errors import InvalidToken

_SALT = "transport.session-token"


def issue(session_id: str) -> str:
    """Return a fresh token for a session."""
    return signing.TimestampSigner(salt=_SALT).sign(session_id)


def session_of(token: str) -> str:
    """Return the session id a token was issued for, or raise InvalidToken."""
    try:
        return signing.TimestampSigner(salt=_SALT).unsign(
            token, max_age=settings.TRANSPORT_TOKEN_MAX_AGE
        )
    except signing.SignatureExpired:
        raise InvalidToken("token expired") from None
    except signing.BadSignature:
        raise InvalidToken("token invalid") from None


def from_header(authorization: str | None) -> str:
    """Return the session id of an `Authorization: Bearer <token>` header."""
    if not authorization:
        raise InvalidToken("missing Authorization: Bearer <token>")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise InvalidToken("Authorization must be: Bearer <token>")
    return session_of(token.strip())
