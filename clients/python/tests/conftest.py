"""Test harness: a real `tuplespace up` in a temporary directory, every SAP on a free loopback
port. Every wait polls an observable condition against a deadline.

The binary is $TUPLESPACE_BIN, else target/release/tuplespace of the repository (or of
$CARGO_TARGET_DIR); the configuration is the repository's config/tuplespace.toml."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import pytest

import tuplespace

REPO = Path(__file__).resolve().parents[3]
CONFIG = Path(os.environ.get("TUPLESPACE_CONFIG", REPO / "config" / "tuplespace.toml"))
READY_TIMEOUT = 30.0


def binary() -> Path:
    if os.environ.get("TUPLESPACE_BIN"):
        return Path(os.environ["TUPLESPACE_BIN"])
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    if not target.is_absolute():
        target = REPO / target
    return target / "release" / "tuplespace"


_given: set = set()


def free_sap() -> str:
    """127.0.0.1:PORT on a UDP port the OS just gave out (never the same twice here)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _given:
            _given.add(port)
            return f"127.0.0.1:{port}"


def wait_until(cond: Callable[[], bool], timeout: float, what: str, every: float = 0.02) -> None:
    """Polls `cond` until it holds; AssertionError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(every)


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def session_pids(sid: int) -> List[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                fields = (p / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid:  # state ppid pgrp session
                out.append(int(p.name))
    return out


class Service:
    """`tuplespace up` (in a session of its own, so every process it starts can be found)."""

    def __init__(self, tmp: Path, sets: List[str]):
        self.dir = tmp
        (tmp / "data").mkdir()
        self.certs = tmp / "certs"
        self.sets = sets
        self.saps: Dict[str, str] = {
            k: free_sap() for k in ("client", "server", "shutdown", "primary", "backup", "heartbeat")
        }
        self.client_sap = self.saps["client"]
        self.admin_sap = self.saps["shutdown"]
        self.up: Optional[subprocess.Popen] = None
        self.log = tmp / "up.log"

    def start(self) -> None:
        bin_ = binary()
        if not bin_.is_file():
            pytest.fail(f"{bin_} does not exist: build it with `cargo build --release` or set TUPLESPACE_BIN")
        args = [str(bin_), "up", "--config", str(CONFIG), "--certs", "certs"]
        for k in ("client", "server", "shutdown", "primary", "backup", "heartbeat"):
            args += [f"--{k}-sap", self.saps[k]]
        for s in self.sets:
            args += ["--set", s]
        env = dict(os.environ, RUST_LOG="info", NO_COLOR="1")
        with open(self.log, "ab") as log:
            self.up = subprocess.Popen(
                args, cwd=self.dir, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True,
            )

    def logs(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-20000:]
        except OSError:
            return ""

    def status(self) -> Optional[dict]:
        """STATUS's `cluster` map, or None if the admin SAP does not answer."""

        # The sync client runs its own loop in a thread: callable from async tests too.
        try:
            a = tuplespace.connect_admin_sync(
                self.admin_sap, self.certs, connect_timeout=1.0, request_timeout=3.0
            )
        except tuplespace.TupleSpaceError:
            return None
        try:
            return a.status()
        except tuplespace.TupleSpaceError:
            return None
        finally:
            a.close()

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> dict:
        """Waits for a primary with a synchronised backup."""
        deadline = time.monotonic() + timeout
        while True:
            if self.up is not None and self.up.poll() is not None:
                raise AssertionError(f"up exited ({self.up.returncode}) while starting\n{self.logs()}")
            st = self.status() if self.certs.joinpath("admin.pem").exists() else None
            if st and st.get("backup_synced") is True and st.get("primary"):
                return st
            if time.monotonic() >= deadline:
                raise AssertionError(f"no primary with a synchronised backup within {timeout} s: {st}\n{self.logs()}")
            time.sleep(0.05)

    def wait_pairs(self, n: int, timeout: float = 10.0) -> None:
        """Waits until STATUS counts `n` pairs (the proxy's count may lag an acknowledged write
        by a heartbeat, issue 12)."""
        seen: list = []

        def count_is_n() -> bool:
            seen.append((self.status() or {}).get("pairs"))
            return seen[-1] == n

        try:
            wait_until(count_is_n, timeout, f"STATUS pairs == {n}")
        except AssertionError as e:
            raise AssertionError(f"{e}; last seen {seen[-1:]}") from None

    def replica_pids(self) -> List[int]:
        st = self.status() or {}
        return [r["pid"] for r in (st.get("primary"), st.get("backup")) if r]

    def kill_everything(self) -> None:
        if self.up is None:
            return
        pids = session_pids(self.up.pid)
        for pid in pids + [self.up.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in pids:  # a stopped process must go too
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        self.up.wait(timeout=15)
        wait_until(lambda: not any(alive(p) for p in pids), 15, f"processes {pids} gone after SIGKILL")


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


@pytest.fixture
def up_factory(tmp_path, request):
    """`up_factory(*sets)` starts `tuplespace up --set ...` and waits until it is ready."""
    started: List[Service] = []

    def start(*sets: str, ready: bool = True) -> Service:
        d = tmp_path / f"up{len(started)}"
        d.mkdir()
        svc = Service(d, list(sets))
        started.append(svc)
        svc.start()
        if ready:
            svc.wait_ready()
        return svc

    yield start
    failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
    for svc in started:
        svc.kill_everything()
        if failed:
            print(f"---- {svc.log} ----\n{svc.logs()}")


@pytest.fixture
def service(up_factory) -> Service:
    """A ready `up` with the shipped configuration."""
    return up_factory()
