#!/usr/bin/env python3
"""How long one log append's fdatasync takes on this machine's disk.

    scripts/fsync-latency.py [DIR] [--gap-us N] [--count N]

Writes a preallocated 16 MiB file in DIR (default: the current directory, which should be on the
disk the replicas' data directories use), then appends 300-byte records to it, each followed by
fdatasync, as the log writer does with fsync = "always" (docs/OPERATIONS.md). --gap-us sleeps
that long before each append: a single client's writes reach the log one at a time with the
machine idle in between, and on a virtual machine an fdatasync issued after an idle spell takes
longer than back-to-back ones (see docs/BENCHMARKS.md). Prints p50/p90/p99 in microseconds.
"""
import argparse
import os
import time

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("dir", nargs="?", default=".")
ap.add_argument("--gap-us", type=float, default=0.0)
ap.add_argument("--count", type=int, default=3000)
a = ap.parse_args()
path = os.path.join(a.dir, "fsync-latency.tmp")
fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
try:
    os.pwrite(fd, b"\0" * (16 << 20), 0)
    os.fsync(fd)
    record, off, lat = b"r" * 300, 0, []
    for _ in range(a.count):
        if a.gap_us:
            time.sleep(a.gap_us / 1e6)
        os.pwrite(fd, record, off)
        off = (off + len(record)) % (16 << 20)
        t = time.perf_counter()
        os.fdatasync(fd)
        lat.append(time.perf_counter() - t)
finally:
    os.close(fd)
    os.unlink(path)
lat.sort()
q = lambda p: lat[min(len(lat) - 1, int(len(lat) * p))] * 1e6
print(f"fdatasync after a {a.gap_us:.0f} us gap, {a.count} appends: "
      f"p50 {q(0.5):.0f} us, p90 {q(0.9):.0f} us, p99 {q(0.99):.0f} us")
