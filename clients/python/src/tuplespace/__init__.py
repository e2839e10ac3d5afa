"""Python client for tuplespace (PROTOCOL.md version 1: QUIC, ALPN `tuplespace/1`, mutual TLS,
4-byte length + CBOR frames).

    import asyncio, tuplespace

    async def main():
        async with await tuplespace.connect("127.0.0.1:7400", certs="certs") as c:
            await c.put(("user,1", "alice"), ("user,2", "bob"))
            print(await c.get(r"user,\\d+", ".*"))

    asyncio.run(main())
"""

from .client import (
    DEFAULT_ADMIN_SAP,
    DEFAULT_CLIENT_SAP,
    Client,
    connect,
    connect_admin,
    parse_sap,
)
from .errors import (
    CLOSE_ERRORS,
    STATUS_ERRORS,
    CertificateFilesError,
    ClientClosed,
    ClosedNormally,
    ConnectError,
    ConnectionClosed,
    ForbiddenOperation,
    ForbiddenRole,
    FrameTooLarge,
    HandshakeFailed,
    MalformedRequest,
    OperatorNotImplemented,
    OutcomeUnknown,
    ProtocolError,
    RequestTimeout,
    ServiceRefused,
    ShuttingDown,
    SlowReader,
    StatusError,
    StreamEnded,
    TooLarge,
    TransportError,
    TupleSpaceError,
    Unavailable,
    UnexpectedStatus,
    UnknownCloseCode,
)
from .protocol import ALPN, Pair, Response, as_tuple
from .sync import SyncClient, connect_admin_sync, connect_sync

__version__ = "0.1.0"

__all__ = [name for name in dir() if not name.startswith("_")]
