"""Many requests in flight on one connection and stream, as the Rust client and bench do."""

import asyncio
import time

import tuplespace
from tuplespace import Pair


async def _gather_watching(c, coros):
    """Runs `coros` concurrently; returns (results, most requests seen outstanding at once)."""
    peak = 0
    done = asyncio.Event()

    async def watch():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, c.outstanding)
            await asyncio.sleep(0)

    w = asyncio.ensure_future(watch())
    try:
        return await asyncio.gather(*coros), peak
    finally:
        done.set()
        await w


def test_pipelined_requests_on_one_connection(service):
    async def body():
        async with await tuplespace.connect(service.client_sap, service.certs) as c:
            n = 2000
            t0 = time.monotonic()
            res, peak = await _gather_watching(c, [c.put((f"p,{i}", str(i))) for i in range(n)])
            took = time.monotonic() - t0
            assert res == [[]] * n
            assert peak > 100, f"only {peak} requests were ever outstanding at once"
            print(f"\n{n} pipelined PUTs on one connection: {took:.3f} s, peak {peak} outstanding")
            got = await c.get(r"p,\d+")
            assert sorted(int(p.key[1]) for p in got) == list(range(n))
            # Requests on one stream take effect in the order they were sent.
            ops = [c.put(("o,1", "v0"))] + [c.post(("o,1", f"v{i}")) for i in range(1, 200)]
            ops += [c.get("o,1"), c.delete("o,1"), c.get("o,1")]
            res = await asyncio.gather(*ops)
            assert res[:200] == [[]] * 200
            assert res[200] == [Pair(("o", "1"), ("v199",))]
            assert res[201] == [Pair(("o", "1"), ("v199",))]
            assert res[202] == []
            # A status error answers only its own request; the others go on.
            res = await asyncio.gather(
                c.get("p,1"), c.call("FROB"), c.get("p,2"), return_exceptions=True
            )
            assert res[0] == [Pair(("p", "1"), ("1",))] and res[2] == [Pair(("p", "2"), ("2",))]
            assert isinstance(res[1], tuplespace.OperatorNotImplemented)
        service.wait_pairs(n)

    asyncio.run(body())


def test_max_outstanding_bounds_requests_in_flight(service):
    async def body():
        async with await tuplespace.connect(service.client_sap, service.certs, max_outstanding=4) as c:
            res, peak = await _gather_watching(c, [c.put((f"q,{i}", "x")) for i in range(300)])
            assert res == [[]] * 300
            assert 1 <= peak <= 4, peak
            assert len(await c.get(r"q,\d+")) == 300

    asyncio.run(body())
