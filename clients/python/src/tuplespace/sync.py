"""A small blocking wrapper: the async Client runs on an event loop in a background thread (so
QUIC keeps answering, keep-alives included, between calls)."""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Any, Coroutine, List, Optional, TypeVar, Union

from .client import DEFAULT_ADMIN_SAP, DEFAULT_CLIENT_SAP, Client, PairLike, _NO_ARGS
from .protocol import Pair, Response

T = TypeVar("T")


class SyncClient:
    """Blocking counterpart of `Client`, same methods, same exceptions:

        with SyncClient("127.0.0.1:7400", certs="certs") as c:
            c.put(("user,1", "alice"))
            print(c.get(r"user,\\d+"))
    """

    def __init__(
        self,
        sap: str = DEFAULT_CLIENT_SAP,
        certs: Union[str, os.PathLike] = "certs",
        role: str = "client",
        **kw: Any,
    ):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="tuplespace-client", daemon=True
        )
        self._thread.start()
        try:
            self._client: Client = self._run(Client.connect(sap, certs, role, **kw))
        except BaseException:
            self._stop()
            raise

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> "SyncClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self._thread.is_alive():
            try:
                self._run(self._client.close())
            finally:
                self._stop()

    @property
    def client(self) -> Client:
        """The async client underneath (use only from its loop)."""
        return self._client

    def request(self, op: str, args: Any = _NO_ARGS, *, timeout: Optional[float] = None,
                limit: Optional[int] = None, wait: Optional[float] = None) -> Response:
        return self._run(self._client.request(op, args, timeout=timeout, limit=limit, wait=wait))

    def call(self, op: str, args: Any = _NO_ARGS, *, timeout: Optional[float] = None,
             limit: Optional[int] = None, wait: Optional[float] = None) -> Response:
        return self._run(self._client.call(op, args, timeout=timeout, limit=limit, wait=wait))

    def get(self, keyexp: str, valexp: str = ".*", *, limit: Optional[int] = None,
            wait: Optional[float] = None) -> List[Pair]:
        return self._run(self._client.get(keyexp, valexp, limit=limit, wait=wait))

    def delete(self, keyexp: str, valexp: str = ".*", *, limit: Optional[int] = None,
               wait: Optional[float] = None) -> List[Pair]:
        return self._run(self._client.delete(keyexp, valexp, limit=limit, wait=wait))

    def take(self, keyexp: str, valexp: str = ".*", *, wait: Optional[float] = None) -> Optional[Pair]:
        return self._run(self._client.take(keyexp, valexp, wait=wait))

    def put(self, *pairs: PairLike) -> list:
        return self._run(self._client.put(*pairs))

    def post(self, *pairs: PairLike) -> list:
        return self._run(self._client.post(*pairs))

    def status(self) -> dict:
        return self._run(self._client.status())

    def shutdown(self) -> None:
        self._run(self._client.shutdown())


def connect_sync(sap: str = DEFAULT_CLIENT_SAP, certs: Union[str, os.PathLike] = "certs",
                 role: str = "client", **kw: Any) -> SyncClient:
    """A blocking client (see `SyncClient`)."""
    return SyncClient(sap, certs, role, **kw)


def connect_admin_sync(sap: str = DEFAULT_ADMIN_SAP, certs: Union[str, os.PathLike] = "certs",
                       **kw: Any) -> SyncClient:
    """A blocking client on the shutdown SAP with the admin certificate."""
    return SyncClient(sap, certs, "admin", **kw)
