"""TLS on visitflow's own servers (visitflow/core/tls.py): the ``--ssl-certfile/--ssl-keyfile``
flags of ``visitflow idp`` and ``visitflow tiled serve``, and OPA's bundle server
(visitflow/production/bundle_server.py), which the facility deployment runs with the site's
``kubernetes.io/tls`` Secret (deployments/kubernetes/base/services/).  Real sockets and real
certificates from a CA made here; a wrong pair, an untrusted CA and plain HTTP must each be a
clear error, not a hang."""

from __future__ import annotations

import argparse
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.fixtures.keycloak_production import ca_and_cert
from visitflow.core.tls import tls_files
from visitflow.stack.services import free_port


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    ca, cert, key = ca_and_cert(tmp_path_factory.mktemp("tls"), names=("localhost",), ips=("127.0.0.1",))
    other_ca, other_cert, other_key = ca_and_cert(tmp_path_factory.mktemp("other"), names=("localhost",))
    return {"ca": ca, "cert": cert, "key": key, "other_ca": other_ca, "other_key": other_key}


# ------------------------------------------------------------------------------ the flags' check


def test_no_pair_is_plain_http_and_a_pair_is_uvicorns_arguments(pki):
    assert tls_files(None, None) == {}
    assert tls_files(str(pki["cert"]), str(pki["key"])) == {"ssl_certfile": str(pki["cert"]),
                                                            "ssl_keyfile": str(pki["key"])}


@pytest.mark.parametrize("which, says", [("cert-only", "go together"), ("missing", "no such file"),
                                         ("wrong-key", "does not load"), ("not-pem", "does not load")])
def test_a_bad_pair_is_one_line_naming_the_file(pki, tmp_path, which, says):
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    cert, key = {"cert-only": (pki["cert"], None), "missing": (tmp_path / "nope.crt", pki["key"]),
                 "wrong-key": (pki["cert"], pki["other_key"]), "not-pem": (junk, pki["key"])}[which]
    with pytest.raises(SystemExit) as exc:
        tls_files(str(cert), str(key) if key else None)
    assert says in str(exc.value), exc.value


def test_token_service_cli_takes_the_pair_and_its_default_issuer_is_https(pki):
    from visitflow.token_service import cli

    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    args = p.parse_args(["--host", "127.0.0.1", "--port", "8443",
                         "--ssl-certfile", str(pki["cert"]), "--ssl-keyfile", str(pki["key"])])
    tls = tls_files(args.ssl_certfile, args.ssl_keyfile)   # what run() passes on
    assert cli._issuer(args, argparse.Namespace(issuer=None), tls) == "https://127.0.0.1:8443"
    plain = p.parse_args(["--port", "8180"])
    assert cli._issuer(plain, argparse.Namespace(issuer=None), tls_files(None, None)) == "http://127.0.0.1:8180"


def test_tiled_serve_writes_the_pair_into_uvicorns_section(pki, tmp_path):
    from visitflow.tiled import cli

    p = argparse.ArgumentParser()
    cli.add_tiled_arguments(p)
    args = p.parse_args(["serve", "--issuer", "https://idp.example", "--state-dir", str(tmp_path),
                         "--ssl-certfile", str(pki["cert"]), "--ssl-keyfile", str(pki["key"])])
    assert cli._render(args)["uvicorn"] == {"host": "127.0.0.1", "port": 8000,
                                            "ssl_certfile": str(pki["cert"]), "ssl_keyfile": str(pki["key"])}
    bad = p.parse_args(["serve", "--issuer", "https://idp.example", "--state-dir", str(tmp_path),
                        "--ssl-certfile", str(pki["cert"])])
    with pytest.raises(SystemExit, match="go together"):
        cli._render(bad)


@pytest.mark.slow
def test_visitflow_idp_serves_https_and_refuses_plain_http(pki, tmp_path):
    """The real dev IdP process with the pair: a client trusting the CA gets /health, plain HTTP
    to the port gets no answer, a client trusting another CA is refused at the handshake."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "visitflow.cli", "idp", "--port", str(port),
                             "--ssl-certfile", str(pki["cert"]), "--ssl-keyfile", str(pki["key"])],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                r = httpx.get(f"https://localhost:{port}/health", verify=str(pki["ca"]), timeout=5)
                break
            except httpx.ConnectError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()[-2000:]
                time.sleep(0.3)
        assert r.status_code == 200 and r.json()["issuer"] == f"https://127.0.0.1:{port}"
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://localhost:{port}/health", timeout=5)
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(f"https://localhost:{port}/health", verify=str(pki["other_ca"]), timeout=5)
    finally:
        proc.terminate()
        proc.wait(timeout=20)


# ------------------------------------------------------------------------------ the bundle server


@pytest.fixture
def bundle_server(pki, tmp_path):
    from visitflow.production.bundle_server import make_server

    (tmp_path / "bundles").mkdir()
    (tmp_path / "bundles" / "visitflow.tar.gz").write_bytes(b"bundle-bytes")
    server = make_server(str(tmp_path), "127.0.0.1", 0, tls_files(str(pki["cert"]), str(pki["key"])),
                         handshake_timeout=2)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"localhost:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_bundle_server_serves_the_bundle_over_tls_to_a_client_trusting_the_ca(bundle_server, pki):
    r = httpx.get(f"https://{bundle_server}/bundles/visitflow.tar.gz", verify=str(pki["ca"]), timeout=5)
    assert r.status_code == 200 and r.content == b"bundle-bytes"


def test_bundle_server_refuses_plain_http_and_an_untrusted_client(bundle_server, pki):
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://{bundle_server}/bundles/visitflow.tar.gz", timeout=5)
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"https://{bundle_server}/bundles/visitflow.tar.gz", verify=str(pki["other_ca"]), timeout=5)


def test_a_silent_client_does_not_block_the_bundle_server(bundle_server, pki):
    """A connection that never starts the handshake holds its own thread only."""
    host, port = bundle_server.split(":")
    with socket.create_connection((host, int(port))):
        t0 = time.monotonic()
        r = httpx.get(f"https://{bundle_server}/bundles/visitflow.tar.gz", verify=str(pki["ca"]), timeout=5)
        assert r.status_code == 200 and time.monotonic() - t0 < 2
    ctx = ssl.create_default_context(cafile=str(pki["ca"]))
    with socket.create_connection((host, int(port))) as raw, ctx.wrap_socket(raw, server_hostname="localhost") as s:
        assert s.version() in ("TLSv1.2", "TLSv1.3")


# ------------------------------------------------------------------------------ the TLS sidecar


@pytest.fixture
def tls_proxy(pki, tmp_path):
    """visitflow.core.tls_proxy in front of a plain HTTP server on 127.0.0.1 (blueapi's place)."""
    import asyncio
    import http.server

    from visitflow.core.tls import server_context
    from visitflow.core.tls_proxy import serve

    (tmp_path / "healthz").write_text("ok")
    upstream = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path)))
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    loop = asyncio.new_event_loop()
    started = loop.create_future()
    task = loop.create_task(serve(("127.0.0.1", 0), upstream.server_address[:2],
                                  server_context(str(pki["cert"]), str(pki["key"])), 2, started))
    threading.Thread(target=loop.run_forever, daemon=True).start()
    port = asyncio.run_coroutine_threadsafe(asyncio.wait_for(asyncio.shield(started), 10), loop).result(15)[1]
    yield f"localhost:{port}", upstream
    loop.call_soon_threadsafe(task.cancel)
    upstream.shutdown()
    upstream.server_close()


def test_tls_proxy_forwards_https_to_the_plain_upstream(tls_proxy, pki):
    where, _ = tls_proxy
    with httpx.Client(verify=str(pki["ca"]), timeout=5) as client:
        for _ in range(3):                                  # keep-alive through the proxy
            r = client.get(f"https://{where}/healthz")
            assert r.status_code == 200 and r.text == "ok"


def test_tls_proxy_refuses_plain_http_and_an_untrusted_client(tls_proxy, pki):
    where, _ = tls_proxy
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://{where}/healthz", timeout=5)
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"https://{where}/healthz", verify=str(pki["other_ca"]), timeout=5)


def test_tls_proxy_with_its_upstream_gone_closes_at_once(tls_proxy, pki):
    where, upstream = tls_proxy
    upstream.shutdown()
    upstream.server_close()
    t0 = time.monotonic()
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"https://{where}/healthz", verify=str(pki["ca"]), timeout=8)
    assert time.monotonic() - t0 < 5


def test_tls_proxy_cli_requires_the_pair():
    from visitflow.core.tls_proxy import main

    with pytest.raises(SystemExit, match="required"):
        main(["--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:1"])
