"""The async client: one QUIC connection with one request stream, requests pipelined on it.

Every request gets an id; its frame goes out at once and the caller waits for the answer with
that id, so any number of coroutines may call at the same time on one connection (up to
`max_outstanding` requests in flight; more wait for a slot: back-pressure, as the service allows
1024 outstanding requests per stream by default)."""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import os
import socket
import ssl
from pathlib import Path
from typing import Any, Deque, Dict, List, Optional, Tuple, Union

from cryptography import x509
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import ConnectionTerminated, QuicEvent, StreamDataReceived, StreamReset

from . import errors
from .errors import (
    CertificateFilesError,
    ClientClosed,
    ConnectError,
    ConnectionClosed,
    HandshakeFailed,
    ProtocolError,
    RequestTimeout,
    StreamEnded,
    TransportError,
)
from .protocol import (
    ALPN,
    DEFAULT_MAX_RESPONSE_BYTES,
    FrameDecoder,
    Pair,
    Response,
    TupleLike,
    decode_response,
    encode_frame,
    encode_request,
    pair_value,
)

#: SAPs `tuplespace up` uses by default.
DEFAULT_CLIENT_SAP = "127.0.0.1:7400"
DEFAULT_ADMIN_SAP = "127.0.0.1:7402"

_NO_ARGS = object()

# Application error code of RESET_STREAM / STOP_SENDING when the client gives up on a waiting
# request (any code cancels it, PROTOCOL.md §4a).
STREAM_CANCELLED = 0


def _wait_keys(limit: Optional[int], wait: Optional[float]) -> dict:
    """The §4a keys of a request: `limit` (>= 1) and `wait_ms` (from seconds, >= 0)."""
    extra: dict = {}
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit must be an integer >= 1, not {limit!r}")
        extra["limit"] = limit
    if wait is not None:
        if isinstance(wait, bool) or not isinstance(wait, (int, float)) or wait < 0:
            raise ValueError(f"wait must be a number of seconds >= 0, not {wait!r}")
        extra["wait_ms"] = int(round(wait * 1000))
    return extra
_CRYPTO_ERROR = 0x100

PairLike = Tuple[TupleLike, TupleLike]


def parse_sap(sap: str) -> Tuple[str, int]:
    """`host:port` or `[v6]:port` -> (host, port)."""
    host, sep, port = sap.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ConnectError(f"SAP {sap!r} is not HOST:PORT (e.g. 127.0.0.1:7400)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def _termination_error(event: ConnectionTerminated, closing: bool) -> ConnectionClosed:
    if closing:
        return ClientClosed("close() was called")
    if event.frame_type is None:
        # An application close: one of the service's close codes.
        return errors.close_error(event.error_code, event.reason_phrase)
    if _CRYPTO_ERROR <= event.error_code < _CRYPTO_ERROR + 0x100:
        alert = event.error_code - _CRYPTO_ERROR
        return HandshakeFailed(f"TLS alert {alert}: {event.reason_phrase}", event.error_code)
    return TransportError(event.reason_phrase, event.error_code)


ROLE_URI_PREFIX = "urn:tuplespace:role:"


def _check_service_certificate(quic: QuicConnection, name: str) -> Optional[str]:
    """None if the service's (CA-verified) certificate names `name` (an IP address or a DNS
    name, as a SAN) and carries the node role; else what is wrong."""
    cert = getattr(getattr(quic, "tls", None), "_peer_certificate", None)
    if cert is None:
        return "the service presented no certificate this client can inspect"
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return "the service's certificate has no subject alternative names"
    roles = [u[len(ROLE_URI_PREFIX):] for u in san.get_values_for_type(x509.UniformResourceIdentifier)
             if u.startswith(ROLE_URI_PREFIX)]
    if "node" not in roles:
        return f"the service's certificate has roles {roles}, not node: not a tuplespace service"
    try:
        ip = ipaddress.ip_address(name)
    except ValueError:
        dns = [d.lower().rstrip(".") for d in san.get_values_for_type(x509.DNSName)]
        if name.lower().rstrip(".") in dns:
            return None
        return f"the service's certificate names {dns}, not {name!r}; dial a name it carries"
    ips = san.get_values_for_type(x509.IPAddress)
    if ip in ips:
        return None
    return f"the service's certificate names addresses {[str(i) for i in ips]}, not {name}"


class _Quic(QuicConnectionProtocol):
    """aioquic protocol that hands stream data and the connection's end to the Client."""

    def __init__(self, quic: QuicConnection, **kw: Any):
        super().__init__(quic, **kw)
        self.client: Optional[Client] = None
        self.close_event: Optional[ConnectionTerminated] = None

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, ConnectionTerminated):
            self.close_event = event
        if self.client is not None:
            self.client._on_event(event)


class Client:
    """An open connection to a tuplespace SAP. Make one with `await Client.connect(...)` (or
    `tuplespace.connect`); use it as `async with`.

    Data operations (client SAP): `get`, `delete`, `put`, `post`. Admin operations (shutdown
    SAP, admin certificate): `status`, `shutdown`. Each raises the `StatusError` subclass of a
    status other than `ok`; `request` returns any `Response` as it is."""

    def __init__(
        self,
        protocol: _Quic,
        transport: asyncio.DatagramTransport,
        *,
        sap: str,
        request_timeout: float,
        keep_alive: Optional[float],
        max_outstanding: int,
        max_response_bytes: int,
    ):
        self.sap = sap
        self.request_timeout = request_timeout
        self._protocol = protocol
        self._transport = transport
        self._loop = asyncio.get_running_loop()
        self._quic = protocol._quic
        self._stream_id = self._quic.get_next_available_stream_id()
        self._decoder = FrameDecoder(max_response_bytes)
        self._pending: Dict[int, asyncio.Future] = {}
        self._raw_waiters: Deque[asyncio.Future] = collections.deque()
        # Requests with a wait, each on a stream of its own: stream id -> (decoder, answer).
        self._waiting: Dict[int, Tuple[FrameDecoder, asyncio.Future]] = {}
        self._slots = asyncio.Semaphore(max_outstanding)
        self._next_id = 1
        self._error: Optional[Exception] = None
        self._closing = False
        self._flush_scheduled = False
        self._keep_alive_task: Optional[asyncio.Task] = None
        protocol.client = self
        if protocol.close_event is not None:
            self._on_event(protocol.close_event)
        elif keep_alive:
            self._keep_alive_task = self._loop.create_task(self._keep_alive(keep_alive))

    # -----------------------------------------------------------------------------------------
    # Connecting
    # -----------------------------------------------------------------------------------------

    @classmethod
    async def connect(
        cls,
        sap: str = DEFAULT_CLIENT_SAP,
        certs: Union[str, os.PathLike] = "certs",
        role: str = "client",
        *,
        server_name: Optional[str] = None,
        connect_timeout: float = 5.0,
        request_timeout: float = 15.0,
        idle_timeout: float = 30.0,
        keep_alive: Optional[float] = 5.0,
        max_outstanding: int = 1024,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    ) -> "Client":
        """Connects to `sap` presenting `certs/ROLE.pem` + `ROLE.key` and trusting `certs/ca.pem`
        (the files `tuplespace up` / `tuplespace certs` write).

        `server_name` is the name the service's certificate must carry (default: the SAP's host).
        `request_timeout` bounds the wait for each answer (longer than the service's own, 10 s
        by default, after which it answers `unavailable`). `keep_alive` seconds between pings
        while idle (None: none; the service closes idle connections after 30 s)."""
        host, port = parse_sap(sap)
        certs = Path(certs)
        files = {n: certs / n for n in (f"{role}.pem", f"{role}.key", "ca.pem")}
        for name, path in files.items():
            if not path.is_file():
                raise CertificateFilesError(
                    f"{path} is missing: {certs} must hold {role}.pem, {role}.key and ca.pem "
                    f"(`tuplespace up` or `tuplespace certs` writes them into certs/)"
                )
        config = QuicConfiguration(
            is_client=True,
            alpn_protocols=[ALPN],
            idle_timeout=idle_timeout,
            # aioquic would check the name with service_identity, which cannot parse the role
            # URI SAN (`urn:tuplespace:role:node`); the chain is checked against ca.pem by aioquic
            # and the name and role by _check_service_certificate after the handshake.
            server_name=None,
            verify_mode=ssl.CERT_REQUIRED,
            # aioquic's receive windows: 1 MiB per stream and per connection at first, doubled
            # whenever half is used, as data arrives (not as the application reads it). Answers
            # are held here by the requests' futures, at most max_outstanding of them.
        )
        try:
            config.load_cert_chain(files[f"{role}.pem"], files[f"{role}.key"])
            config.load_verify_locations(cafile=str(files["ca.pem"]))
        except Exception as e:
            raise CertificateFilesError(
                f"cannot load the {role} certificate from {certs}: {e}; "
                f"issue it again with `tuplespace certs`"
            ) from e

        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        except OSError as e:
            raise ConnectError(f"cannot resolve {host!r} of SAP {sap}: {e}") from e
        family, _, _, _, addr = infos[0]
        local = ("::", 0) if family == socket.AF_INET6 else ("0.0.0.0", 0)
        quic = QuicConnection(configuration=config)
        transport, protocol = await loop.create_datagram_endpoint(
            lambda: _Quic(quic), local_addr=local, family=family
        )
        protocol.connect(addr)
        try:
            await asyncio.wait_for(protocol.wait_connected(), connect_timeout)
            problem = _check_service_certificate(quic, server_name or host)
            if problem is not None:
                protocol.close(0x100 + 42, problem)
                transport.close()
                raise HandshakeFailed(problem, 0x100 + 42)
            # One round trip more: by the time the service answers, it has checked our
            # certificate (TLS 1.3 clients finish their handshake first).
            await asyncio.wait_for(protocol.ping(), connect_timeout)
        except asyncio.TimeoutError:
            transport.close()
            raise ConnectError(
                f"no QUIC handshake with {sap} within {connect_timeout} s: nothing listening "
                f"there, or packets are dropped; is the service up?"
            ) from None
        except ConnectionError:
            transport.close()
            ev = protocol.close_event
            if ev is None:
                raise ConnectError(f"the connection to {sap} failed during the handshake") from None
            raise _termination_error(ev, False) from None
        return cls(
            protocol,
            transport,
            sap=sap,
            request_timeout=request_timeout,
            keep_alive=keep_alive,
            max_outstanding=max_outstanding,
            max_response_bytes=max_response_bytes,
        )

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    @property
    def outstanding(self) -> int:
        """Requests sent on this connection and not yet answered."""
        return len(self._pending) + len(self._raw_waiters)

    @property
    def closed(self) -> Optional[Exception]:
        """None while the connection is usable, else why it is not."""
        return self._error

    async def close(self) -> None:
        """Closes the connection (NO_ERROR); requests still waiting fail with ClientClosed."""
        if self._error is None:
            self._closing = True
            self._protocol.close(0, "bye")
            try:
                await asyncio.wait_for(self._protocol.wait_closed(), 2.0)
            except asyncio.TimeoutError:
                pass
            if self._error is None:
                self._fail(ClientClosed("close() was called"))
        self._transport.close()

    # -----------------------------------------------------------------------------------------
    # Requests
    # -----------------------------------------------------------------------------------------

    async def request(
        self,
        op: str,
        args: Any = _NO_ARGS,
        *,
        timeout: Optional[float] = None,
        limit: Optional[int] = None,
        wait: Optional[float] = None,
    ) -> Response:
        """Sends `{id, op, args}` (no `args` key if not given) and returns the answer, whatever
        its status. Raises ConnectionClosed, StreamEnded, RequestTimeout or ProtocolError.

        `limit` and `wait` (seconds) are PROTOCOL.md §4a's `limit` and `wait_ms` (GET and
        DELETE). A request with a wait goes on a stream of its own, so that giving up on it
        (a timeout, or cancelling the task awaiting it) resets that stream, which cancels the
        request in the service; its `timeout` defaults to `request_timeout` + `wait`."""
        extra = _wait_keys(limit, wait)
        if wait:
            return await self._request_waiting(op, args, extra, timeout, wait)
        async with self._slots:
            if self._error is not None:
                raise self._error
            rid = self._next_id
            self._next_id += 1
            fut = self._loop.create_future()
            self._pending[rid] = fut
            try:
                self._send(encode_request(rid, op, None if args is _NO_ARGS else args,
                                          with_args=args is not _NO_ARGS, extra=extra))
                return await self._wait(fut, timeout)
            finally:
                self._pending.pop(rid, None)

    async def _request_waiting(
        self, op: str, args: Any, extra: dict, timeout: Optional[float], wait: float
    ) -> Response:
        async with self._slots:
            if self._error is not None:
                raise self._error
            rid = self._next_id
            self._next_id += 1
            sid = self._quic.get_next_available_stream_id()
            if sid == self._stream_id:
                # The request stream opens with its first request: open it now, so that this
                # request gets a stream of its own.
                self._quic.send_stream_data(self._stream_id, b"", end_stream=False)
                sid = self._quic.get_next_available_stream_id()
            fut = self._loop.create_future()
            self._waiting[sid] = (FrameDecoder(self._decoder.max_bytes), fut)
            answered = False
            try:
                self._quic.send_stream_data(
                    sid,
                    encode_request(rid, op, None if args is _NO_ARGS else args,
                                   with_args=args is not _NO_ARGS, extra=extra),
                    end_stream=False,
                )
                self._schedule_flush()
                r = await self._wait(fut, self.request_timeout + wait if timeout is None else timeout)
                answered = True
                return r
            finally:
                self._waiting.pop(sid, None)
                if self._error is None:
                    if answered:
                        # Done with the stream: finish our side (the service ends its own).
                        self._quic.send_stream_data(sid, b"", end_stream=True)
                    else:
                        # Given up (timeout or cancelled): the reset cancels the request in the
                        # service (§4a), and nothing it may still send is wanted.
                        self._quic.reset_stream(sid, STREAM_CANCELLED)
                        self._quic.stop_stream(sid, STREAM_CANCELLED)
                    self._schedule_flush()

    async def send_frame(self, body: bytes, *, timeout: Optional[float] = None) -> Response:
        """Sends `body` as one frame, as it is (for testing the service with bad input), and
        returns the next answer whose `id` is null (what the service answers to a request it
        could not read). A body with a readable id is answered with that id: use `request`."""
        async with self._slots:
            if self._error is not None:
                raise self._error
            fut = self._loop.create_future()
            self._raw_waiters.append(fut)
            try:
                self._send(encode_frame(body))
                return await self._wait(fut, timeout)
            finally:
                try:
                    self._raw_waiters.remove(fut)
                except ValueError:
                    pass

    async def send_bytes(self, data: bytes) -> None:
        """Writes raw bytes on the request stream (no frame header added, no answer awaited):
        for protocol-violation tests such as a zero-length frame."""
        if self._error is not None:
            raise self._error
        self._send(data)

    async def call(self, op: str, args: Any = _NO_ARGS, *, timeout: Optional[float] = None,
                   limit: Optional[int] = None, wait: Optional[float] = None) -> Response:
        """Like `request`, but raises the StatusError of a status other than `ok`."""
        r = await self.request(op, args, timeout=timeout, limit=limit, wait=wait)
        if r.status != "ok":
            raise errors.status_error(r)
        return r

    async def get(self, keyexp: str, valexp: str = ".*", *, limit: Optional[int] = None,
                  wait: Optional[float] = None) -> List[Pair]:
        """Every pair whose key and value text forms fully match the two regular expressions,
        ascending by key. (A pattern that does not compile matches nothing; `request` shows the
        service's message.) `limit`: at most that many, the first by key. `wait` (seconds): if
        nothing matches, wait up to that long for a PUT or POST that makes something match
        (PROTOCOL.md §4a); [] if none came."""
        return (await self.call("GET", [keyexp, valexp], limit=limit, wait=wait)).pairs or []

    async def delete(self, keyexp: str, valexp: str = ".*", *, limit: Optional[int] = None,
                     wait: Optional[float] = None) -> List[Pair]:
        """Removes and returns the pairs `get` would return (with the same `limit` and `wait`:
        each pair goes to one DELETE only)."""
        return (await self.call("DELETE", [keyexp, valexp], limit=limit, wait=wait)).pairs or []

    async def take(self, keyexp: str, valexp: str = ".*", *,
                   wait: Optional[float] = None) -> Optional[Pair]:
        """Linda `in`: removes and returns the first matching pair (by key), waiting up to `wait`
        seconds for one to appear; None if none did. Exactly once, through a failover too: a
        pair goes to one take only. Cancelling the awaiting task cancels the take."""
        pairs = await self.delete(keyexp, valexp, limit=1, wait=wait)
        return pairs[0] if pairs else None

    async def put(self, *pairs: PairLike) -> list:
        """Inserts each pair whose key is absent; returns those not inserted (key present, or
        ill-formed), as sent, arrays as tuples. A key or value is a tuple of strings or its
        text form: `put(("user,1", "alice"), (("user", "2"), ("bob",)))`."""
        return (await self.call("PUT", [pair_value(p) for p in pairs])).rejected or []

    async def post(self, *pairs: PairLike) -> list:
        """Replaces the value of each pair whose key is present; returns those not used."""
        return (await self.call("POST", [pair_value(p) for p in pairs])).rejected or []

    async def status(self) -> dict:
        """STATUS (admin certificate, shutdown SAP): the `cluster` map (epoch, primary, backup,
        clients, pairs, ...)."""
        return (await self.call("STATUS")).cluster or {}

    async def shutdown(self) -> None:
        """SHUTDOWN (admin certificate, shutdown SAP): the service saves its data and stops."""
        await self.call("SHUTDOWN")

    # -----------------------------------------------------------------------------------------
    # Internals
    # -----------------------------------------------------------------------------------------

    async def _wait(self, fut: asyncio.Future, timeout: Optional[float]) -> Response:
        t = self.request_timeout if timeout is None else timeout
        try:
            return await asyncio.wait_for(fut, t)
        except asyncio.TimeoutError:
            raise RequestTimeout(
                f"no answer from {self.sap} within {t} s; the service may be overloaded or down"
            ) from None

    def _send(self, data: bytes) -> None:
        self._quic.send_stream_data(self._stream_id, data, end_stream=False)
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        # Many requests queued in the same turn of the loop go out together.
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._error is None or self._closing:
            self._protocol.transmit()

    async def _keep_alive(self, every: float) -> None:
        try:
            while self._error is None:
                await asyncio.sleep(every)
                if self._error is None:
                    await asyncio.wait_for(self._protocol.ping(), every)
        except (ConnectionError, asyncio.TimeoutError, asyncio.CancelledError):
            return

    def _on_event(self, event: QuicEvent) -> None:
        if isinstance(event, StreamDataReceived) and event.stream_id == self._stream_id:
            try:
                for body in self._decoder.feed(event.data):
                    self._dispatch(decode_response(body))
            except ProtocolError as e:
                self._fail(e)
                self._protocol.close(0, "protocol error")
                return
            if event.end_stream:
                self._fail(StreamEnded("the service ended the request stream; connect again"))
        elif isinstance(event, StreamReset) and event.stream_id == self._stream_id:
            self._fail(StreamEnded(f"the service reset the request stream (code {event.error_code})"))
        elif isinstance(event, (StreamDataReceived, StreamReset)) and event.stream_id in self._waiting:
            decoder, fut = self._waiting[event.stream_id]
            if isinstance(event, StreamReset):
                err: Optional[Exception] = StreamEnded(
                    f"the service reset a waiting request's stream (code {event.error_code})")
            else:
                err = None
                try:
                    for body in decoder.feed(event.data):
                        if not fut.done():
                            fut.set_result(decode_response(body))
                except ProtocolError as e:
                    self._fail(e)
                    self._protocol.close(0, "protocol error")
                    return
                if event.end_stream and not fut.done():
                    err = StreamEnded("the service ended a waiting request's stream without an answer")
            if err is not None and not fut.done():
                fut.set_exception(err)
        elif isinstance(event, ConnectionTerminated):
            self._fail(_termination_error(event, self._closing))

    def _dispatch(self, r: Response) -> None:
        fut = self._pending.get(r.id) if r.id is not None else None
        if fut is None and r.id is None and self._raw_waiters:
            fut = self._raw_waiters.popleft()
        if fut is not None and not fut.done():
            fut.set_result(r)
        # Otherwise: the answer to a request whose caller gave up (timeout); dropped.

    def _fail(self, err: Exception) -> None:
        if self._error is None:
            self._error = err
        waiting = [fut for _, fut in self._waiting.values()]
        for fut in list(self._pending.values()) + list(self._raw_waiters) + waiting:
            if not fut.done():
                fut.set_exception(self._error)
        if self._keep_alive_task is not None:
            self._keep_alive_task.cancel()


async def connect(sap: str = DEFAULT_CLIENT_SAP, certs: Union[str, os.PathLike] = "certs",
                  role: str = "client", **kw: Any) -> Client:
    """`Client.connect`: see there."""
    return await Client.connect(sap, certs, role, **kw)


async def connect_admin(sap: str = DEFAULT_ADMIN_SAP, certs: Union[str, os.PathLike] = "certs",
                        **kw: Any) -> Client:
    """A connection to the shutdown SAP with the admin certificate (for `status`, `shutdown`)."""
    return await Client.connect(sap, certs, "admin", **kw)
