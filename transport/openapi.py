"""The OpenAPI 3.1 document of the REST transport, served at /transport/openapi.json.

Request bodies and query strings come from the msgspec schemas that
validate them (transport.frames), so they cannot drift from the views;
responses are described here, and the schemathesis tests check every
answer of a live server against them.
"""

from functools import cache
from typing import Any

import msgspec
from django.http import HttpRequest, HttpResponse
from django.views.decorators.http import require_GET

from transport import frames

JSON = "application/json"
Schema = dict[str, Any]


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: Schema, description: str) -> Schema:
    return {"description": description, "content": {JSON: {"schema": schema}}}


def _obj(required: dict[str, Schema], optional: dict[str, Schema] | None = None) -> Schema:
    """Return a closed object schema: exactly these fields, nothing else."""
    return {
        "type": "object",
        "properties": {**required, **(optional or {})},
        "required": list(required),
        "additionalProperties": False,
    }


_STRING = {"type": "string"}
_ACTION_ID = {"anyOf": [{"type": "string", "minLength": 1, "maxLength": 128}, {"type": "integer"}]}

RESPONSE_SCHEMAS: dict[str, Schema] = {
    "Error": _obj({"error": _obj({"code": _STRING, "message": _STRING})}),
    "Session": _obj(
        {
            "session_id": {"type": "string", "pattern": "^s_"},
            "token": {"type": "string", "minLength": 1},
            "next_seq": {"type": "integer", "const": 1},
        }
    ),
    "Reply": {
        "oneOf": [
            _obj(
                {
                    "type": {"const": "reply"},
                    "id": _ACTION_ID,
                    "ok": {"const": True},
                    "payload": {},
                }
            ),
            _obj(
                {
                    "type": {"const": "reply"},
                    "id": _ACTION_ID,
                    "ok": {"const": False},
                    "error": _obj({"code": _STRING, "message": _STRING}),
                }
            ),
        ]
    },
    "Pending": _obj({"id": _ACTION_ID, "status": {"const": "pending"}}),
    "Message": _obj(
        {
            "seq": {"type": "integer", "minimum": 1},
            "message_type": _STRING,
            "payload": {},
            "sent_at": {
                "type": "string",
                "pattern": r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$",
            },
        }
    ),
    "Batch": _obj(
        {
            "messages": {"type": "array", "items": _ref("Message"), "maxItems": frames.MAX_BATCH},
            "next_after": {"type": "integer", "minimum": 0},
            "gap": {"type": "boolean"},
        }
    ),
}

_ERRORS = {
    "400": ("malformed body or query (codes invalid_json, unknown_type, bad_request)"),
    "401": "token missing, forged, truncated or expired (invalid_token)",
    "404": "the token is genuine but its session has expired (no_such_session)",
    "413": "body larger than TRANSPORT_MAX_FRAME_BYTES (too_large)",
    "429": "rate limited (rate_limited); Retry-After says when to try again",
    "503": "the database or channel layer is unavailable (unavailable)",
}


def _errors(*statuses: str) -> dict[str, Schema]:
    responses = {status: _json(_ref("Error"), _ERRORS[status]) for status in statuses}
    if "429" in responses:
        responses["429"]["headers"] = {
            "Retry-After": {
                "description": "seconds to wait",
                "required": True,
                "schema": {"type": "integer", "minimum": 1},
            }
        }
    return responses


def _query(schema: type[msgspec.Struct], descriptions: dict[str, str]) -> list[Schema]:
    """Describe a query string's parameters from the msgspec schema that validates it."""
    (ref,), components = msgspec.json.schema_components([schema])
    properties = components[schema.__name__]["properties"]
    parameters = []
    for name, description in descriptions.items():
        prop = {key: value for key, value in properties[name].items() if key != "default"}
        if "anyOf" in prop:  # `T | None`: absent, not null, on a query string
            prop = next(p for p in prop["anyOf"] if p.get("type") != "null")
        parameters.append(
            {"name": name, "in": "query", "description": description, "schema": prop}
        )
    return parameters


def _body(name: str) -> Schema:
    return {"required": True, "content": {JSON: {"schema": _ref(name)}}}


def _token_link(operation: str) -> Schema:
    return {
        "operationId": operation,
        "parameters": {"header.Authorization": "Bearer {$response.body#/token}"},
    }


def _paths() -> dict[str, Schema]:
    after = "acknowledges every seq up to it; messages after it are returned"
    return {
        "/transport/sessions": {
            "post": {
                "operationId": "createSession",
                "summary": "Create a session and its mailbox",
                "security": [],
                "responses": {
                    "201": {
                        **_json(_ref("Session"), "the new session and its token"),
                        "links": {
                            op: _token_link(op)
                            for op in ("sendAction", "poll", "readMailbox", "ack")
                        },
                    },
                    **_errors("413", "429", "503"),
                },
            }
        },
        "/transport/actions": {
            "post": {
                "operationId": "sendAction",
                "summary": "Send one action; the same id again gets the first reply",
                "requestBody": _body("ActionBody"),
                "responses": {
                    "200": _json(_ref("Reply"), "the handler's reply, or an error reply"),
                    "202": _json(
                        _ref("Pending"),
                        "no reply within TRANSPORT_ACTION_TIMEOUT; it follows as a message",
                    ),
                    **_errors("400", "401", "404", "413", "429", "503"),
                },
            }
        },
        "/transport/poll": {
            "get": {
                "operationId": "poll",
                "summary": "Answer when a message is queued after `after`, or at the timeout",
                "parameters": _query(
                    frames.PollQuery,
                    {
                        "after": after,
                        "timeout": "seconds to wait (default 25); capped by "
                        "TRANSPORT_POLL_TIMEOUT_MAX",
                    },
                ),
                "responses": {
                    "200": _json(_ref("Batch"), "queued messages, or none at the timeout"),
                    **_errors("400", "401", "404", "429", "503"),
                },
            }
        },
        "/transport/mailbox": {
            "get": {
                "operationId": "readMailbox",
                "summary": "Read what is queued after `after`, never waiting",
                "parameters": _query(
                    frames.MailboxQuery,
                    {"after": after, "limit": f"at most this many ({frames.DEFAULT_BATCH})"},
                ),
                "responses": {
                    "200": _json(_ref("Batch"), "queued messages"),
                    **_errors("400", "401", "404", "429", "503"),
                },
            }
        },
        "/transport/ack": {
            "post": {
                "operationId": "ack",
                "summary": "Acknowledge every message up to a seq",
                "requestBody": _body("AckBody"),
                "responses": {
                    "204": {"description": "acknowledged"},
                    **_errors("400", "401", "404", "413", "429", "503"),
                },
            }
        },
    }


@cache
def document() -> Schema:
    """Return the OpenAPI document (built once per process)."""
    _, bodies = msgspec.json.schema_components(
        [frames.ActionBody, frames.AckBody], ref_template="#/components/schemas/{name}"
    )
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "transport REST API",
            "version": "1",
            "description": "The REST long-poll transport of wire protocol version 1. "
            "Unknown fields in bodies and unknown query parameters are ignored.",
        },
        "paths": _paths(),
        "components": {
            "schemas": {**bodies, **RESPONSE_SCHEMAS},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }


@require_GET
def openapi(request: HttpRequest) -> HttpResponse:
    """Called by API tools: serve the OpenAPI document."""
    return HttpResponse(msgspec.json.encode(document()), content_type=JSON)
