"""Session tokens: the session id, signed with a timestamp.

A token proves which session it was issued for, and stops working after
TRANSPORT_TOKEN_MAX_AGE; the session it names must also still be alive.
"""

import functools
import time

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
        session_id, issued = _signed(token, settings.SECRET_KEY)
    except signing.BadSignature:
        raise InvalidToken("token invalid") from None
    if time.time() - issued > settings.TRANSPORT_TOKEN_MAX_AGE:
        raise InvalidToken("token expired")
    return session_id


@functools.lru_cache(maxsize=4096)
def _signed(token: str, secret_key: str) -> tuple[str, int]:
    """Check a token's signature; return its session id and when it was issued.

    A client sends the same token with every request, and checking it
    (key derivation and HMAC) cost about a tenth of a light request; the
    age is checked on every use. The key is part of the cache's key, so a
    changed SECRET_KEY checks again. Failures are not cached.
    """
    signer = signing.TimestampSigner(salt=_SALT)
    session_id = signer.unsign(token)
    issued = signing.b62_decode(token.rsplit(signer.sep, 2)[1])
    return session_id, issued


def from_header(authorization: str | None) -> str:
    """Return the session id of an `Authorization: Bearer <token>` header."""
    if not authorization:
        raise InvalidToken("missing Authorization: Bearer <token>")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise InvalidToken("Authorization must be: Bearer <token>")
    return session_of(token.strip())
