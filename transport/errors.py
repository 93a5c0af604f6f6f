"""Errors of the transport, each with the wire code clients see."""


class TransportError(Exception):
    """An error answered to the client as {"code", "message"}."""

    code = "error"
    status = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(TransportError):
    code = "bad_request"


class InvalidJSON(BadRequest):
    code = "invalid_json"


class UnknownType(BadRequest):
    code = "unknown_type"


class InvalidToken(TransportError):
    """The token is missing, forged, truncated or too old."""

    code = "invalid_token"
    status = 401


class NoSuchSession(TransportError):
    code = "no_such_session"
    status = 404


class TooLarge(TransportError):
    code = "too_large"
    status = 413

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"{size} bytes is more than the limit of {limit}")
        self.size = size


class RateLimited(TransportError):
    code = "rate_limited"
    status = 429

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"too many requests; retry in {retry_after} s")
        self.retry_after = retry_after


class Unavailable(TransportError):
    code = "unavailable"
    status = 503
