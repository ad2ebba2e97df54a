"""The console's refusals: one exception, and every reason code it answers with.

The API answers a :class:`ConsoleError` as ``{"error": {"code", "message", "field"?}}``
with its status (``app.py``'s handler); pages show the message. A code is stable:
clients branch on it, never on the words. ``docs/api.md`` lists them all (a test
checks that it does).
"""

from __future__ import annotations

#: Every reason code the console answers with, its HTTP status and what it means.
CODES: dict[str, tuple[int, str]] = {
    "unauthenticated": (401, "no valid token, session or trusted proxy identity"),
    "forbidden": (403, "the user's role may not do this (a viewer writing or replaying)"),
    "csrf_failed": (403, "a POST from a session or proxy identity without the right CSRF token"),
    "rate_limited": (429, "too many writes by this user this minute (see Retry-After)"),
    "request_too_large": (413, "the request body is larger than the console accepts"),
    "invalid_request": (422, "a query parameter, path or body that is not what the route "
                             "takes (field names it)"),
    "bad_request": (400, "a request the server cannot read, or text PostgreSQL cannot hold (a "
                         "NUL character) in a path, filter or cursor (field names it)"),
    "not_found": (404, "no route at this path"),
    "method_not_allowed": (405, "the route does not take this method"),
    "internal_error": (500, "the console failed; the log has the details"),
    "idempotency_key_required": (400, "a write without an Idempotency-Key header"),
    "idempotency_key_invalid": (400, "an Idempotency-Key that is not 1-200 letters, digits, "
                                     "'.', '_', ':' or '-', not '.' first"),
    "idempotency_key_reused": (409, "this user sent this Idempotency-Key before with another "
                                    "request, or a command under this key and the user's "
                                    "console source was received from elsewhere"),
    "invalid_message": (422, "the command would be dead-lettered as invalid_message: the body "
                             "does not fit the contract (field names the place)"),
    "message_too_large": (413, "the command would be larger than the service accepts"),
    "source_not_allowed": (409, "the service's allow-list for credit-note-commands does not "
                                "admit the console's source (CREDITNOTES_ALLOWED_SOURCES_"
                                "CREDIT_NOTE_COMMANDS needs <prefix>/*)"),
    "invoice_not_found": (404, "no invoice has this id"),
    "credit_note_not_found": (404, "no credit note has this id (or number)"),
    "command_not_found": (404, "this user sent no command with this Idempotency-Key"),
    "dead_letter_not_found": (404, "no dead letter at this partition and offset"),
    "topic_not_found": (404, "the broker has no such topic"),
    "not_dead_letter_topic": (400, "the topic is not the dead-letter topic of an input topic"),
    "unavailable": (503, "PostgreSQL or the broker cannot be reached, or a command's publish "
                         "failed (it may have been sent: retry with the same Idempotency-Key, "
                         "one effect)"),
}


class ConsoleError(Exception):
    """A refusal the console answers with ``status`` and a stable ``code``."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field

    def body(self) -> dict[str, dict[str, str]]:
        """The JSON body the API answers with."""
        error = {"code": self.code, "message": self.message}
        if self.field is not None:
            error["field"] = self.field
        return {"error": error}


def refused(code: str, message: str | None = None, field: str | None = None) -> ConsoleError:
    """The error of a code of :data:`CODES`, with its status (and its meaning as the message
    unless one is given)."""
    status, meaning = CODES[code]
    return ConsoleError(status, code, message or meaning, field)
