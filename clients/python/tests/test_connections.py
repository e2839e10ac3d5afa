"""Certificates (a wrong one is refused) and every close code the service uses."""

import asyncio
import shutil
import subprocess
import time

import pytest

import tuplespace
from conftest import binary, free_sap, wait_until


def foreign_certs(tmp_path):
    """A second cluster's certificates (another CA)."""
    out = tmp_path / "foreign"
    subprocess.run([str(binary()), "certs", "--out", str(out)], check=True, capture_output=True, timeout=60)
    return out


def test_wrong_certificates_are_refused(service, tmp_path):
    foreign = foreign_certs(tmp_path)

    async def body():
        # Our certificate from another CA: the service refuses the handshake.
        with pytest.raises(tuplespace.HandshakeFailed) as e:
            c = await tuplespace.connect(service.client_sap, foreign, connect_timeout=5)
            await c.get(".*")
        assert e.value.code is not None and 0x100 <= e.value.code < 0x200, e.value
        # Our certificate is right but we trust another CA: we refuse the service.
        mixed = tmp_path / "mixed"
        mixed.mkdir()
        for f in ("client.pem", "client.key"):
            shutil.copy(service.certs / f, mixed / f)
        shutil.copy(foreign / "ca.pem", mixed / "ca.pem")
        with pytest.raises(tuplespace.HandshakeFailed):
            await tuplespace.connect(service.client_sap, mixed)
        # The service's certificate does not name what we dialled.
        with pytest.raises(tuplespace.HandshakeFailed) as e:
            await tuplespace.connect(service.client_sap, service.certs, server_name="example.com")
        assert "example.com" in str(e.value)
        # A client certificate on the shutdown SAP: closed with FORBIDDEN before any request.
        with pytest.raises(tuplespace.ForbiddenRole) as e:
            c = await tuplespace.connect(service.admin_sap, service.certs)
            await c.status()
        assert e.value.code == 0x2 and e.value.name == "FORBIDDEN"
        # Missing files, nothing listening.
        with pytest.raises(tuplespace.CertificateFilesError):
            await tuplespace.connect(service.client_sap, tmp_path / "nowhere")
        t0 = time.monotonic()
        with pytest.raises(tuplespace.ConnectError):
            await tuplespace.connect(free_sap(), service.certs, connect_timeout=1.0)
        assert time.monotonic() - t0 < 3
        # After all that, the right certificate still works.
        async with await tuplespace.connect(service.client_sap, service.certs) as c:
            assert await c.get(".*") == []

    asyncio.run(body())


def test_frames_of_length_zero_or_over_the_limit_close_with_frame_too_large(service):
    async def body():
        c = await tuplespace.connect(service.client_sap, service.certs)
        await c.send_bytes(b"\x00\x00\x00\x00")
        with pytest.raises(tuplespace.FrameTooLarge) as e:
            await c.get(".*")
        assert e.value.code == 0x3
        # One PUT of more than max_request_bytes (1 MiB by default).
        c = await tuplespace.connect(service.client_sap, service.certs)
        big = [(f"k,{i}", "v" * 4000) for i in range(300)]
        with pytest.raises(tuplespace.FrameTooLarge):
            await c.put(*big)
        await c.close()

    asyncio.run(body())


def test_over_max_clients_is_service_refused(up_factory):
    svc = up_factory("max_clients=1")

    async def body():
        async with await tuplespace.connect(svc.client_sap, svc.certs) as first:
            assert await first.get(".*") == []
            with pytest.raises(tuplespace.ServiceRefused) as e:
                second = await tuplespace.connect(svc.client_sap, svc.certs)
                await second.get(".*")
            assert e.value.code == 0x1 and e.value.reason.startswith("service refused"), e.value
            assert await first.get(".*") == []

    asyncio.run(body())


def test_shutdown_closes_clients_with_shutting_down(up_factory):
    svc = up_factory()

    async def body():
        c = await tuplespace.connect(svc.client_sap, svc.certs)
        assert await c.put(("a,1", "x")) == []
        async with await tuplespace.connect_admin(svc.admin_sap, svc.certs) as a:
            await a.shutdown()
        deadline = time.monotonic() + 15
        while c.closed is None and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert isinstance(c.closed, tuplespace.ShuttingDown), repr(c.closed)
        with pytest.raises(tuplespace.ShuttingDown):
            await c.get(".*")
        await c.close()

    asyncio.run(body())
    wait_until(lambda: svc.up.poll() is not None, 30, "up exits after SHUTDOWN")


def test_the_service_certificate_must_carry_the_node_role_and_the_name_dialled(service):
    from types import SimpleNamespace

    from cryptography import x509

    from tuplespace.client import _check_service_certificate

    def check(pem, name):
        cert = x509.load_pem_x509_certificate((service.certs / pem).read_bytes())
        return _check_service_certificate(SimpleNamespace(tls=SimpleNamespace(_peer_certificate=cert)), name)

    for name in ("127.0.0.1", "localhost", "::1", "LOCALHOST"):
        assert check("node.pem", name) is None, name
    assert "10.0.0.1" in check("node.pem", "10.0.0.1")
    assert "example.com" in check("node.pem", "example.com")
    # A client or admin certificate from the same CA is not a service's.
    assert "not node" in check("client.pem", "127.0.0.1")
    assert "not node" in check("admin.pem", "localhost")
