"""PUT/GET/POST/DELETE and patterns, through the sync wrapper and the async API."""

import asyncio

import pytest

import tuplespace
from tuplespace import Pair


def test_put_get_post_delete_with_patterns(service):
    with tuplespace.SyncClient(service.client_sap, service.certs) as c:
        assert c.put(("user,1", "alice"), (("user", "2"), ("bob",)), ("user,10", "carol,smith")) == []
        # Key present (also one inserted earlier in the same request): rejected, as sent.
        assert c.put(("user,1", "mallory"), ("x,1", "a"), ("x,1", "b")) == [
            (("user", "1"), ("mallory",)),
            (("x", "1"), ("b",)),
        ]
        # Ascending by key text form; patterns match the whole text form.
        assert c.get(r"user,\d+") == [
            Pair(("user", "1"), ("alice",)),
            Pair(("user", "10"), ("carol", "smith")),
            Pair(("user", "2"), ("bob",)),
        ]
        assert c.get("user", ".*") == []
        assert c.get(r"user,\d", "b.*") == [Pair(("user", "2"), ("bob",))]
        assert c.get(".*", r"\w+,smith") == [Pair(("user", "10"), ("carol", "smith"))]
        # POST replaces present keys only.
        assert c.post(("user,1", "alicia"), ("user,99", "nobody")) == [(("user", "99"), ("nobody",))]
        assert c.get("user,1") == [Pair(("user", "1"), ("alicia",))]
        # Ill-formed elements go to `rejected` exactly as sent.
        r = c.request("PUT", [[["ok"], ["1"]], "junk", [["bad key"], ["v"]], 5])
        assert r.ok and r.rejected == ["junk", (("bad key",), ("v",)), 5]
        # A pattern that does not compile: ok, no pairs, a message naming it.
        r = c.request("GET", ["user,(", ".*"])
        assert r.ok and r.pairs == [] and "user,(" in (r.message or ""), r
        assert c.get("user,(") == []
        # DELETE returns and removes.
        assert c.delete(r"user,1\d*") == [
            Pair(("user", "1"), ("alicia",)),
            Pair(("user", "10"), ("carol", "smith")),
        ]
        assert c.get(".*") == [
            Pair(("ok",), ("1",)),
            Pair(("user", "2"), ("bob",)),
            Pair(("x", "1"), ("a",)),
        ]
        # Unicode alphanumerics are elements too.
        assert c.put(("naïve,日本", "ü")) == []
        assert c.get("naïve,.*") == [Pair(("naïve", "日本"), ("ü",))]
        service.wait_pairs(4)


def test_async_api_and_context_manager(service):
    async def body():
        async with await tuplespace.connect(service.client_sap, service.certs) as c:
            assert await c.put(("a,1", "x")) == []
            assert await c.get("a,.*") == [Pair(("a", "1"), ("x",))]
            assert await c.delete("a,1") == [Pair(("a", "1"), ("x",))]
            assert await c.get(".*") == []
        assert isinstance(c.closed, tuplespace.ClientClosed)
        with pytest.raises(tuplespace.ClientClosed):
            await c.get(".*")
        # The admin certificate may do data operations on the client SAP too.
        async with await tuplespace.connect(service.client_sap, service.certs, role="admin") as a:
            assert await a.put(("b,1", "y")) == []
        async with await tuplespace.connect_admin(service.admin_sap, service.certs) as adm:
            st = await adm.status()
            assert st["epoch"] >= 1 and st["primary"]["pid"] > 0, st
        await asyncio.to_thread(service.wait_pairs, 1)

    asyncio.run(body())
