#!/usr/bin/env python3
"""A small userspace UDP relay that injects faults: loss, delay with jitter, duplication,
reordering, and a one-way or two-way cut. It stands in for `tc netem`, which is not available.

Each client address seen on --listen gets an upstream socket of its own (an ephemeral port) that
talks to --target; datagrams coming back on it are sent to that client from the --listen socket.
"up" is client -> target, "down" is target -> client.

Parameters can be changed while it runs: with --control FILE, the relay re-reads FILE (JSON, the
same names as the options with '-' as '_', e.g. {"delay": 50, "jitter": 10, "drop": 0.05})
whenever its modification time changes; values missing from the file fall back to the command
line. An empty object ({}) means the command-line values. `scripts/fault.sh` writes this file.

Fault semantics, applied independently to every datagram of the directions in --direction:
  drop P        discard with probability P (0..1)
  delay MS      hold for MS milliseconds, plus a uniform random jitter in [-JITTER, +JITTER]
                (clamped at 0); jitter alone reorders datagrams whose sending times cross
  duplicate P   send a second copy with probability P (the copy 1 ms after the original)
  reorder P     with probability P, hold a datagram REORDER_GAP ms longer than the others, so the
                datagrams behind it overtake it
  cut_direction none|up|down|both: discard every datagram of that direction (a partition of
                the relayed path only)
"""

import argparse
import heapq
import json
import os
import random
import selectors
import signal
import socket
import sys
import time

BUF = 4 * 1024 * 1024
DEFAULTS = {
    "drop": 0.0,
    "delay": 0.0,
    "jitter": 0.0,
    "duplicate": 0.0,
    "reorder": 0.0,
    "reorder_gap": 15.0,
    "cut_direction": "none",
    "direction": "both",
}


def sap(text):
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"`{text}` is not HOST:PORT")
    return (host.strip("[]"), int(port))


def probability(text):
    v = float(text)
    if v > 1.0:  # accept percentages too
        v = v / 100.0
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"`{text}` is not a probability (0..1 or 0..100%)")
    return v


def parse_args(argv):
    p = argparse.ArgumentParser(
        description="UDP relay with fault injection (loss, delay, jitter, duplication, "
        "reordering, one-way cut).",
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--listen", type=sap, required=True, help="HOST:PORT clients send to")
    p.add_argument("--target", type=sap, required=True, help="HOST:PORT datagrams are relayed to")
    p.add_argument("--drop", type=probability, default=0.0, help="loss probability (0..1)")
    p.add_argument("--delay", type=float, default=0.0, help="added delay in ms")
    p.add_argument("--jitter", type=float, default=0.0, help="uniform delay jitter +/- ms")
    p.add_argument("--duplicate", type=probability, default=0.0, help="duplication probability")
    p.add_argument("--reorder", type=probability, default=0.0, help="reordering probability")
    p.add_argument("--reorder-gap", type=float, default=15.0, help="extra hold of a reordered datagram, ms")
    p.add_argument(
        "--cut-direction",
        choices=["none", "up", "down", "both"],
        default="none",
        help="drop every datagram of this direction (up = client->target)",
    )
    p.add_argument(
        "--direction",
        choices=["up", "down", "both"],
        default="both",
        help="directions drop/delay/duplicate/reorder apply to",
    )
    p.add_argument("--control", help="JSON file with parameters, re-read when it changes")
    p.add_argument("--seed", type=int, help="random seed (reproducible faults)")
    p.add_argument("--idle-timeout", type=float, default=300.0, help="forget a client after S idle seconds")
    p.add_argument("--stats-every", type=float, default=10.0, help="log counters every S seconds (0: never)")
    return p.parse_args(argv)


def log(msg):
    print(time.strftime("%H:%M:%S"), "udp_relay:", msg, file=sys.stderr, flush=True)


class Relay:
    def __init__(self, args):
        self.args = args
        self.base = {k: getattr(args, k) for k in DEFAULTS}
        self.params = dict(self.base)
        self.control_mtime = None
        self.rng = random.Random(args.seed)
        self.sel = selectors.DefaultSelector()
        self.listen = self._socket()
        self.listen.bind(args.listen)
        self.sel.register(self.listen, selectors.EVENT_READ, None)
        self.sessions = {}  # client addr -> [upstream socket, last activity]
        self.heap = []  # (due, seq, socket, data, addr or None)
        self.seq = 0
        self.stats = {k: 0 for k in ("up", "down", "dropped", "cut", "duplicated", "reordered", "delayed")}
        self.last_stats = dict(self.stats)

    def _socket(self):
        s = socket.socket(socket.AF_INET6 if ":" in self.args.target[0] else socket.AF_INET, socket.SOCK_DGRAM)
        for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            try:
                s.setsockopt(socket.SOL_SOCKET, opt, BUF)
            except OSError:
                pass
        s.setblocking(False)
        return s

    def reload(self):
        path = self.args.control
        if not path:
            return
        try:
            mtime = os.stat(path).st_mtime_ns
        except FileNotFoundError:
            mtime = None
        if mtime == self.control_mtime:
            return
        self.control_mtime = mtime
        new = dict(self.base)
        if mtime is not None:
            try:
                with open(path) as f:
                    text = f.read().strip()
                data = json.loads(text) if text else {}
            except (OSError, ValueError) as e:
                log(f"control file {path} unreadable ({e}); keeping {self.params}")
                return
            for k, v in data.items():
                k = k.replace("-", "_")
                if k not in DEFAULTS:
                    log(f"control file: unknown parameter {k!r} ignored")
                    continue
                if k in ("drop", "duplicate", "reorder"):
                    v = float(v)
                    v = v / 100.0 if v > 1.0 else v
                elif k in ("delay", "jitter", "reorder_gap"):
                    v = float(v)
                new[k] = v
        if new != self.params:
            self.params = new
            log("parameters: " + json.dumps(self.params, sort_keys=True))

    def upstream(self, client):
        s = self.sessions.get(client)
        if s is None:
            sock = self._socket()
            sock.connect(self.args.target)
            self.sel.register(sock, selectors.EVENT_READ, client)
            s = self.sessions[client] = [sock, time.monotonic()]
            log(f"new client {client[0]}:{client[1]} -> via {sock.getsockname()[1]}")
        s[1] = time.monotonic()
        return s[0]

    def schedule(self, due, sock, data, addr):
        self.seq += 1
        heapq.heappush(self.heap, (due, self.seq, sock, data, addr))

    def send(self, sock, data, addr):
        try:
            if addr is None:
                sock.send(data)
            else:
                sock.sendto(data, addr)
        except (BlockingIOError, ConnectionRefusedError, OSError):
            pass  # like the network: a datagram that cannot go is lost

    def forward(self, direction, sock, data, addr):
        p = self.params
        self.stats[direction] += 1
        if p["cut_direction"] in (direction, "both"):
            self.stats["cut"] += 1
            return
        now = time.monotonic()
        if p["direction"] not in (direction, "both"):
            self.send(sock, data, addr)
            return
        if p["drop"] and self.rng.random() < p["drop"]:
            self.stats["dropped"] += 1
            return
        delay = p["delay"]
        if p["jitter"]:
            delay += self.rng.uniform(-p["jitter"], p["jitter"])
        if p["reorder"] and self.rng.random() < p["reorder"]:
            delay += p["reorder_gap"]
            self.stats["reordered"] += 1
        delay = max(0.0, delay)
        copies = 2 if p["duplicate"] and self.rng.random() < p["duplicate"] else 1
        if copies == 2:
            self.stats["duplicated"] += 1
        if delay <= 0.0 and not self.heap:
            self.send(sock, data, addr)
        else:
            if delay > 0.0:
                self.stats["delayed"] += 1
            self.schedule(now + delay / 1000.0, sock, data, addr)
        if copies == 2:
            self.schedule(now + (delay + 1.0) / 1000.0, sock, data, addr)

    def flush_due(self):
        now = time.monotonic()
        while self.heap and self.heap[0][0] <= now:
            _, _, sock, data, addr = heapq.heappop(self.heap)
            self.send(sock, data, addr)

    def expire(self):
        now = time.monotonic()
        for client, (sock, last) in list(self.sessions.items()):
            if now - last > self.args.idle_timeout:
                self.sel.unregister(sock)
                sock.close()
                del self.sessions[client]

    def run(self):
        log(f"relaying {self.args.listen[0]}:{self.args.listen[1]} -> {self.args.target[0]}:{self.args.target[1]}")
        self.reload()
        next_housekeeping = time.monotonic()
        next_stats = time.monotonic() + self.args.stats_every
        while True:
            timeout = 0.2
            if self.heap:
                timeout = max(0.0, min(timeout, self.heap[0][0] - time.monotonic()))
            for key, _ in self.sel.select(timeout):
                sock = key.fileobj
                for _ in range(64):  # drain a burst, but stay fair to timers
                    try:
                        data, addr = sock.recvfrom(65535)
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:
                        break  # e.g. ICMP port unreachable reported on a connected socket
                    if key.data is None:
                        self.forward("up", self.upstream(addr), data, None)
                    else:
                        if key.data in self.sessions:
                            self.sessions[key.data][1] = time.monotonic()
                        self.forward("down", self.listen, data, key.data)
            self.flush_due()
            now = time.monotonic()
            if now >= next_housekeeping:
                self.reload()
                self.expire()
                next_housekeeping = now + 0.2
            if self.args.stats_every and now >= next_stats:
                if self.stats != self.last_stats:
                    log("counters: " + json.dumps(self.stats, sort_keys=True))
                    self.last_stats = dict(self.stats)
                next_stats = now + self.args.stats_every


def main(argv):
    args = parse_args(argv)
    relay = Relay(args)

    def stop(signum, _frame):
        log(f"signal {signum}: counters " + json.dumps(relay.stats, sort_keys=True))
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    relay.run()


if __name__ == "__main__":
    main(sys.argv[1:])
