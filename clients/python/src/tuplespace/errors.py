"""Typed exceptions: one per response status (PROTOCOL.md §4) and one per connection close code
(PROTOCOL.md §5, plus SLOW_READER from docs/SECURITY.md). Every message says what failed and what
to do about it."""

from __future__ import annotations

from typing import Any, Optional


class TupleSpaceError(Exception):
    """Base class of every error this package raises."""


# ---------------------------------------------------------------------------------------------
# Statuses: the service answered, but not `ok`.
# ---------------------------------------------------------------------------------------------


class StatusError(TupleSpaceError):
    """The service answered with a status other than `ok`.

    `status` is the wire status, `message` the service's explanation, `response` the whole
    decoded answer (a `tuplespace.Response`)."""

    status: str = ""
    hint: str = ""

    def __init__(self, response: Any):
        self.response = response
        self.message: Optional[str] = getattr(response, "message", None)
        self.request_id: Optional[int] = getattr(response, "id", None)
        text = f"the service answered `{self.status}`"
        if self.message:
            text += f": {self.message}"
        if self.hint:
            text += f" ({self.hint})"
        super().__init__(text)


class MalformedRequest(StatusError):
    status = "malformed"
    hint = "the request could not be understood; check its shape against PROTOCOL.md §3"


class OperatorNotImplemented(StatusError):
    status = "not-implemented"
    hint = "the service does not know this operator"


class ForbiddenOperation(StatusError):
    status = "forbidden"
    hint = (
        "STATUS/SHUTDOWN go to the shutdown SAP with the admin certificate, "
        "GET/PUT/POST/DELETE to the client SAP"
    )


class TooLarge(StatusError):
    status = "too-large"
    hint = "the answer would exceed max_response_bytes; nothing was changed, narrow the pattern"


class Unavailable(StatusError):
    status = "unavailable"
    hint = "no replica could serve it within the request timeout; it was not applied, retry later"


class OutcomeUnknown(StatusError):
    status = "unknown"
    hint = (
        "a replica failed after receiving it and none left can tell whether it was applied; "
        "re-read to find out"
    )


class UnexpectedStatus(StatusError):
    """A status this client does not know (a newer service)."""

    hint = "a status this client does not know; upgrade the client"

    def __init__(self, response: Any):
        self.status = getattr(response, "status", "?")
        super().__init__(response)


STATUS_ERRORS = {
    cls.status: cls
    for cls in (
        MalformedRequest,
        OperatorNotImplemented,
        ForbiddenOperation,
        TooLarge,
        Unavailable,
        OutcomeUnknown,
    )
}


def status_error(response: Any) -> StatusError:
    """The exception for a non-`ok` response."""
    return STATUS_ERRORS.get(response.status, UnexpectedStatus)(response)


# ---------------------------------------------------------------------------------------------
# The connection ended.
# ---------------------------------------------------------------------------------------------


class ConnectionClosed(TupleSpaceError):
    """The connection is gone; requests still waiting on it failed with this.

    `code` is the QUIC application close code (None for a transport-level close), `name` its
    PROTOCOL.md name, `reason` the peer's reason phrase."""

    code: Optional[int] = None
    name: str = ""
    hint: str = ""

    def __init__(self, reason: str = "", code: Optional[int] = None):
        if code is not None:
            self.code = code
        self.reason = reason
        label = self.name or (f"code {self.code:#x}" if self.code is not None else "closed")
        text = f"the connection was closed ({label})"
        if reason:
            text += f": {reason}"
        if self.hint:
            text += f"; {self.hint}"
        super().__init__(text)


class ClosedNormally(ConnectionClosed):
    code = 0x0
    name = "NO_ERROR"
    hint = "connect again to go on"


class ServiceRefused(ConnectionClosed):
    code = 0x1
    name = "SERVICE_REFUSED"
    hint = "the proxy has too many clients (or too many for this certificate); retry later"


class ForbiddenRole(ConnectionClosed):
    code = 0x2
    name = "FORBIDDEN"
    hint = (
        "this certificate's role is not allowed on this SAP "
        "(client SAP: client or admin; shutdown SAP: admin)"
    )


class FrameTooLarge(ConnectionClosed):
    code = 0x3
    name = "FRAME_TOO_LARGE"
    hint = "a request frame was empty or over max_request_bytes; split the request"


class ShuttingDown(ConnectionClosed):
    code = 0x4
    name = "SHUTTING_DOWN"
    hint = "the service is stopping; connect again once it is back"


class SlowReader(ConnectionClosed):
    code = 0x5
    name = "SLOW_READER"
    hint = "too many answers were left unread for too long (docs/SECURITY.md); read answers promptly"


class UnknownCloseCode(ConnectionClosed):
    hint = "a close code this client does not know"


class TransportError(ConnectionClosed):
    """Closed by QUIC itself (not by the service's application): protocol error, idle timeout,
    or a TLS failure (see `HandshakeFailed`)."""

    hint = "the QUIC connection failed; connect again"


class HandshakeFailed(TransportError):
    """TLS refused: our certificate is not from the cluster CA (the service refuses it), or the
    service's certificate is not from the CA in ca.pem / does not name the address dialled."""

    hint = (
        "check that client.pem/client.key and ca.pem come from the cluster's `tuplespace certs` "
        "directory and that the SAP is the service's"
    )


class ClientClosed(ConnectionClosed):
    """This client closed the connection (close() was called)."""

    hint = "connect again to send more requests"


CLOSE_ERRORS = {
    cls.code: cls
    for cls in (ClosedNormally, ServiceRefused, ForbiddenRole, FrameTooLarge, ShuttingDown, SlowReader)
}


def close_error(code: int, reason: str) -> ConnectionClosed:
    """The exception for an application close with `code`."""
    cls = CLOSE_ERRORS.get(code)
    if cls is None:
        return UnknownCloseCode(reason, code)
    return cls(reason)


# ---------------------------------------------------------------------------------------------
# Other failures.
# ---------------------------------------------------------------------------------------------


class ConnectError(TupleSpaceError):
    """Could not connect: nothing listening, unreachable, or no handshake within the timeout."""


class CertificateFilesError(ConnectError):
    """The certificate directory lacks a file or holds one that cannot be read."""


class RequestTimeout(TupleSpaceError):
    """No answer within the client's request timeout (the service answers `unavailable` after
    its own request timeout, default 10 s; this one should be longer)."""


class ProtocolError(TupleSpaceError):
    """The service sent something that is not a response of PROTOCOL.md."""


class StreamEnded(TupleSpaceError):
    """The service ended or reset the request stream without answering."""
