"""Waiting reads and takes (PROTOCOL.md §4a) through the Python client: `take`, `get`/`delete`
with `limit` and `wait`, a timeout, and cancelling a waiting take by giving up on it."""

import asyncio
import time

import pytest

import tuplespace
from tuplespace import Pair

LIMIT_WORDS = "max_waiters_per_connection"


def test_limit_and_take_order(service):
    with tuplespace.SyncClient(service.client_sap, service.certs) as c:
        assert c.put(("job,3", "c"), ("job,1", "a"), ("job,2", "b")) == []
        # limit: the first pairs in key order; a GET removes nothing.
        assert c.get(r"job,\d", limit=2) == [Pair(("job", "1"), ("a",)), Pair(("job", "2"), ("b",))]
        # take: one pair, the first by key, removed.
        assert c.take(r"job,\d") == Pair(("job", "1"), ("a",))
        assert c.take(r"job,\d") == Pair(("job", "2"), ("b",))
        assert c.delete(r"job,\d", limit=5) == [Pair(("job", "3"), ("c",))]
        # Nothing left, no wait: None at once.
        assert c.take(r"job,\d") is None
        with pytest.raises(ValueError):
            c.get("job,1", limit=0)
        with pytest.raises(ValueError):
            c.take("job,1", wait=-1)


def test_a_take_that_times_out_changes_nothing(service):
    with tuplespace.SyncClient(service.client_sap, service.certs) as c:
        assert c.put(("other,1", "x")) == []
        t = time.monotonic()
        r = c.request("DELETE", [r"job,\d+", ".*"], limit=1, wait=0.3)
        took = time.monotonic() - t
        assert r.ok and r.pairs == [] and "timed out" in (r.message or ""), r
        assert took >= 0.3, took
        assert c.take(r"job,\d+", wait=0.1) is None
        assert c.get(".*") == [Pair(("other", "1"), ("x",))]


def test_waiting_takes_receive_later_puts_each_once(service):
    async def body():
        async with await tuplespace.connect(service.client_sap, service.certs) as consumer, \
                await tuplespace.connect(service.client_sap, service.certs) as producer:
            takes = [asyncio.ensure_future(consumer.take(r"job,\d+", wait=20)) for _ in range(4)]
            for i in range(4):
                assert await producer.put((f"job,{i}", f"payload{i}")) == []
            got = await asyncio.gather(*takes)
            assert sorted(p.key for p in got) == [("job", str(i)) for i in range(4)], got
            assert await producer.get(".*") == []

    asyncio.run(body())


def test_giving_up_on_a_waiting_take_cancels_it(up_factory):
    # One waiting request per connection: a second one is refused at once with a message
    # naming the limit, which shows from outside whether the first one is waiting.
    svc = up_factory("max_waiters_per_connection=1")

    async def body():
        async with await tuplespace.connect(svc.client_sap, svc.certs) as c, \
                await tuplespace.connect(svc.client_sap, svc.certs) as other:

            async def first_waits() -> bool:
                r = await c.request("GET", ["probe,1", ".*"], wait=0.05)
                assert r.ok and r.pairs == [], r
                return LIMIT_WORDS in (r.message or "")

            def start_take() -> "asyncio.Future":
                return asyncio.ensure_future(
                    c.request("DELETE", [r"job,\d+", ".*"], limit=1, wait=60))

            deadline = time.monotonic() + 10
            take = start_take()
            await asyncio.sleep(0)  # a turn of the loop: the take is sent before the first probe
            while True:
                assert time.monotonic() < deadline, "the take never waited in the service"
                if take.done():
                    # The service saw a probe first and refused the take: issue it again.
                    assert LIMIT_WORDS in (take.result().message or ""), take.result()
                    take = start_take()
                    await asyncio.sleep(0)
                    continue
                if await first_waits():
                    break
            take.cancel()
            with pytest.raises(asyncio.CancelledError):
                await take
            # Until the service has cancelled it, a probe is refused; then it waits (and times
            # out: nothing matches probe,1).
            while await first_waits():
                assert time.monotonic() < deadline + 10, "the cancelled take still waits"
            # A job PUT now stays: the cancelled take did not get it.
            assert await other.put(("job,1", "x")) == []
            assert await other.get(r"job,\d+") == [Pair(("job", "1"), ("x",))]

    asyncio.run(body())
