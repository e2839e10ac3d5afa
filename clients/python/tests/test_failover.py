"""kill -9 of the primary while clients write: writes go on, nothing is lost or applied twice."""

import asyncio
import os
import signal
import time

import tuplespace
from conftest import alive


def test_kill_primary_during_writes_loses_nothing(service):
    st0 = service.status()
    epoch0, primary0 = st0["epoch"], st0["primary"]["pid"]

    async def body():
        conns = [await tuplespace.connect(service.client_sap, service.certs) for _ in range(2)]
        acked = []  # (key, time acknowledged)
        stop = asyncio.Event()

        async def writer(c, w):
            i = 0
            while not stop.is_set():
                key = f"w,{w},{i}"
                # Every write must be acknowledged `ok` with nothing rejected: a rejection
                # would mean a re-sent write was applied twice.
                assert await c.put((key, str(i))) == [], key
                acked.append((key, time.monotonic()))
                i += 1

        tasks = [asyncio.ensure_future(writer(conns[w % 2], w)) for w in range(6)]

        async def until(cond, timeout, what):
            deadline = time.monotonic() + timeout
            while not cond():
                for t in tasks:
                    if t.done():
                        t.result()  # a writer failed: raise its error
                assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
                await asyncio.sleep(0.01)

        try:
            await until(lambda: len(acked) >= 300, 30, "300 writes before the kill")
            os.kill(primary0, signal.SIGKILL)
            n_kill = len(acked)
            await until(lambda: not alive(primary0), 10, "old primary gone")
            await until(lambda: len(acked) >= n_kill + 300, 30, "300 writes after the kill")
        finally:
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
        for t in tasks:
            t.result()
        # The longest time without an acknowledgement around the kill.
        times = [t for _, t in acked]
        gap = max(b - a for a, b in zip(times, times[1:]))
        print(
            f"\n{len(acked)} writes acknowledged ({n_kill} before the kill); longest gap "
            f"{gap * 1000:.0f} ms"
        )
        got = await conns[0].get(r"w,\d+,\d+")
        got_keys = sorted(",".join(p.key) for p in got)
        assert got_keys == sorted(k for k, _ in acked), "acknowledged writes lost (or extra ones)"
        for c in conns:
            await c.close()

    asyncio.run(body())
    st = service.status()
    assert st["epoch"] > epoch0 and st["primary"]["pid"] != primary0, st
