"""The wire format of PROTOCOL.md (sans-IO): frames, requests, responses, tuples.

A frame is a 4-byte big-endian length N, then N bytes holding one CBOR item."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any, Iterable, List, NamedTuple, Optional, Sequence, Tuple, Union

import cbor2

from .errors import ProtocolError

#: ALPN of the client protocol (PROTOCOL.md §1).
ALPN = "tuplespace/1"
#: Default limits of the service (config/tuplespace.toml).
DEFAULT_MAX_REQUEST_BYTES = 1 << 20
DEFAULT_MAX_RESPONSE_BYTES = 64 << 20

Tuple_ = Tuple[str, ...]
#: A tuple as the caller may give it: a sequence of strings, or its text form `"user,42"`.
TupleLike = Union[str, Sequence[str]]


class Pair(NamedTuple):
    """A (key, value) pair of tuples, as GET and DELETE return them."""

    key: Tuple_
    value: Tuple_

    def text(self) -> str:
        """`key=value` in text form (elements joined by commas)."""
        return ",".join(self.key) + "=" + ",".join(self.value)


def as_tuple(t: TupleLike) -> Tuple_:
    """A tuple from a sequence of strings or from its text form (`"user,42"`)."""
    if isinstance(t, str):
        return tuple(t.split(","))
    out = tuple(t)
    for e in out:
        if not isinstance(e, str):
            raise TypeError(f"tuple elements must be strings, got {e!r} in {t!r}")
    return out


def pair_value(p: Any) -> list:
    """The CBOR value of a pair given as `(key, value)`, each a `TupleLike`."""
    if isinstance(p, (str, bytes)) or len(p) != 2:
        raise TypeError(
            f"a pair is (key, value), each a tuple of strings or a text form like 'user,1'; got {p!r}"
        )
    k, v = p
    return [list(as_tuple(k)), list(as_tuple(v))]


def frozen(v: Any) -> Any:
    """A decoded CBOR value with arrays as tuples (so rejected pairs compare equal to what was
    sent as tuples)."""
    if isinstance(v, list):
        return tuple(frozen(x) for x in v)
    if isinstance(v, dict):
        return {k: frozen(x) for k, x in v.items()}
    return v


def encode_frame(body: bytes) -> bytes:
    """`body` with its 4-byte length."""
    return struct.pack(">I", len(body)) + body


def encode_request(request_id: int, op: str, args: Any = None, *, with_args: bool = True,
                   extra: Optional[dict] = None) -> bytes:
    """One framed request (PROTOCOL.md §3); `extra` adds keys such as `limit` and `wait_ms`
    (§4a)."""
    req: dict = {"id": request_id, "op": op}
    if with_args:
        req["args"] = args
    if extra:
        req.update(extra)
    return encode_frame(cbor2.dumps(req))


@dataclass
class Response:
    """A decoded response (PROTOCOL.md §4). Keys that were absent are None."""

    id: Optional[int]
    status: str
    pairs: Optional[List[Pair]] = None
    rejected: Optional[list] = None
    message: Optional[str] = None
    cluster: Optional[dict] = None
    raw: dict = field(default_factory=dict, repr=False)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _pair_of(v: Any) -> Pair:
    if (
        isinstance(v, list)
        and len(v) == 2
        and all(isinstance(t, list) and all(isinstance(e, str) for e in t) for t in v)
    ):
        return Pair(tuple(v[0]), tuple(v[1]))
    raise ProtocolError(f"response `pairs` holds something that is not a pair: {v!r}")


def decode_response(body: bytes) -> Response:
    """A response from a frame body; ProtocolError if it is not one."""
    try:
        v = cbor2.loads(body)
    except Exception as e:  # cbor2 raises several types
        raise ProtocolError(f"response frame is not CBOR: {e}") from e
    if not isinstance(v, dict):
        raise ProtocolError(f"response is not a CBOR map: {v!r}"[:300])
    rid = v.get("id")
    status = v.get("status")
    if not isinstance(status, str) or not (rid is None or isinstance(rid, int)):
        raise ProtocolError(f"response without a text `status` or with a bad `id`: {v!r}"[:300])
    pairs = v.get("pairs")
    if pairs is not None:
        if not isinstance(pairs, list):
            raise ProtocolError("response `pairs` is not an array")
        pairs = [_pair_of(p) for p in pairs]
    rejected = v.get("rejected")
    if rejected is not None:
        if not isinstance(rejected, list):
            raise ProtocolError("response `rejected` is not an array")
        rejected = [frozen(x) for x in rejected]
    message = v.get("message")
    cluster = v.get("cluster")
    return Response(
        id=rid,
        status=status,
        pairs=pairs,
        rejected=rejected,
        message=message if isinstance(message, str) else None,
        cluster=cluster if isinstance(cluster, dict) else None,
        raw=v,
    )


class FrameDecoder:
    """Splits a byte stream into frame bodies, refusing lengths of 0 or above `max_bytes`.

    Holds at most one partial frame (bounded by `max_bytes` + 4)."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_RESPONSE_BYTES):
        self.max_bytes = max_bytes
        self._buf = bytearray()

    def feed(self, data: bytes) -> Iterable[bytes]:
        """Adds `data`; yields every complete frame body."""
        self._buf += data
        while len(self._buf) >= 4:
            (n,) = struct.unpack_from(">I", self._buf, 0)
            if n == 0 or n > self.max_bytes:
                raise ProtocolError(
                    f"response frame length {n} is 0 or above max_response_bytes ({self.max_bytes})"
                )
            if len(self._buf) < 4 + n:
                return
            body = bytes(self._buf[4 : 4 + n])
            del self._buf[: 4 + n]
            yield body

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held."""
        return len(self._buf)
