"""The pure parts of ``python -m benchmarks.facility``: its arguments, sizes, the ideal
makespan, the TLS statement per hop, the run's certificates and database URLs, and the table it
writes from measured samples.  (No server; the measuring itself is the benchmark's run,
benchmarks/results/facility.md; start-local.sh's TLS on a real server is
tests/production/test_shipped_files.py's.)"""

from __future__ import annotations

import pytest

from benchmarks import facility, measures
from benchmarks.facility_topology import HOPS, hops


def test_defaults_measure_every_row_on_the_production_idp_beside_the_local_stack():
    args = facility.parse_args([])
    assert args.only == {"P1", "P2", "P7"} and args.idp == "production" and args.local and not args.quick
    assert args.out.endswith("benchmarks/results/facility.md")


def test_rows_idp_and_local_can_be_chosen_and_unknown_rows_are_refused(capsys):
    args = facility.parse_args(["--only", "p1, p7", "--idp", "dev", "--no-local", "--quick"])
    assert args.only == {"P1", "P7"} and args.idp == "dev" and not args.local and args.quick
    assert args.argv == ["--only", "p1, p7", "--idp", "dev", "--no-local", "--quick"], "the results name the command"
    with pytest.raises(SystemExit):
        facility.parse_args(["--only", "P1,P3"])
    assert "unknown rows ['P3']" in capsys.readouterr().err


def test_quick_is_smaller_and_p7_keeps_the_local_benchmarks_shape():
    full, quick = facility.sizes(False), facility.sizes(True)
    assert (full.p7_triggers, full.p7_seconds, full.p7_concurrency, full.p2_frames) == (100, 2.0, 20, 100)
    assert all(getattr(quick, f) <= getattr(full, f) for f in ("p1_starts", "p1_triggers", "p2_frames", "p7_triggers"))


def test_ideal_makespan_is_whole_waves_of_the_concurrency_limit():
    assert facility.ideal_makespan(100, 2.0, 20) == 10.0
    assert facility.ideal_makespan(30, 2.0, 20) == 4.0     # a second, partial wave still takes 2 s


def test_every_hop_is_tls_with_the_production_idp_and_none_with_the_dev_idp():
    prod, dev = hops("production"), hops("dev")
    assert len(prod) == len(dev) == len(HOPS) == 9
    assert all(t.startswith("TLS") for _, _, t in prod), prod
    assert dict((h, t) for h, _, t in prod)["databases"] == "TLS (verify-full; plain logins refused)"
    assert all(not t.startswith("TLS") for _, _, t in dev), dev
    assert dict((h, t) for h, _, t in dev)["databases"].startswith("plain TCP")
    with pytest.raises(ValueError):
        hops("staging")


def test_the_report_says_what_each_idp_mode_encrypts_and_what_postgresql_counted():
    assert "Every hop is TLS" in facility._tls_sentence("production")
    assert "every hop is plain" in facility._tls_sentence("dev")
    counted = {"facility": {"database_tls": {"up": "9 of 9 TLS (TLSv1.3)", "end": "12 of 12 TLS (TLSv1.3)"}}}
    assert facility._db_tls_sentence(counted).endswith(
        "9 of 9 TLS (TLSv1.3) once the topology was up, 12 of 12 TLS (TLSv1.3) before it was stopped.")
    assert facility._db_tls_sentence({"facility": {}}) == "" == facility._db_tls_sentence({})


def test_one_ca_signs_a_certificate_for_each_server_naming_localhost_and_127_0_0_1(tmp_path):
    """The run's PKI (pure crypto, no server): each server's pair chains to the run's CA only and
    passes hostname checks for both loopback names; the clients' environment names that CA."""
    import ssl

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from benchmarks.facility_topology import TLS_SERVERS, run_tls

    tls = run_tls(tmp_path / "ca")
    assert set(tls.pairs) == set(TLS_SERVERS) == {"postgres", "opa", "token-service", "tiled", "prefect"}
    ca = x509.load_pem_x509_certificate(tls.ca.read_bytes())
    for server in TLS_SERVERS:
        cert_path, key_path = tls.pair(server)
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        cert.verify_directly_issued_by(ca)
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
        assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        assert key.public_key().public_numbers() == cert.public_key().public_numbers(), server
        ssl.create_default_context().load_cert_chain(cert_path, key_path)   # a pair a server can load
    env = tls.client_env()
    assert env == {"SSL_CERT_FILE": str(tls.ca), "PREFECT_API_SSL_CERT_FILE": str(tls.ca), "PGSSLROOTCERT": str(tls.ca)}


def test_database_urls_ask_each_driver_for_verify_full_in_its_own_words():
    from benchmarks.postgres import database_url

    tls = "postgresql://postgres:pw@127.0.0.1:5432/postgres?sslmode=verify-full&sslrootcert=/tmp/run/ca/ca.pem"
    assert database_url(tls, "tiled_tables") == \
        "postgresql://postgres:pw@127.0.0.1:5432/tiled_tables?sslmode=verify-full&sslrootcert=/tmp/run/ca/ca.pem"
    # SQLAlchemy hands the query to asyncpg.connect as keywords: ``ssl`` it knows, ``sslrootcert`` it does not
    assert database_url(tls, "prefect", "postgresql+asyncpg") == \
        "postgresql+asyncpg://postgres:pw@127.0.0.1:5432/prefect?ssl=verify-full"
    plain = "postgresql://postgres:pw@127.0.0.1:5432/postgres"
    assert database_url(plain, "prefect", "postgresql+asyncpg") == "postgresql+asyncpg://postgres:pw@127.0.0.1:5432/prefect"
    assert database_url(plain, "t") == "postgresql://postgres:pw@127.0.0.1:5432/t"


def test_asyncpg_reads_the_asyncpg_url_as_verify_full_against_pgsslrootcert(tmp_path, monkeypatch):
    """What the asyncpg URL above becomes in the driver (its own parser, no connection): a context
    that checks the hostname and requires a certificate from the CA ``PGSSLROOTCERT`` names."""
    import ssl

    from asyncpg.connect_utils import _parse_connect_dsn_and_args
    from sqlalchemy.engine import make_url
    from sqlalchemy.dialects.postgresql.asyncpg import PGDialect_asyncpg

    from benchmarks.facility_topology import run_tls
    from benchmarks.postgres import database_url

    tls = run_tls(tmp_path / "ca")
    monkeypatch.setenv("PGSSLROOTCERT", str(tls.ca))
    monkeypatch.delenv("PGSSLMODE", raising=False)
    url = database_url("postgresql://postgres:pw@127.0.0.1:5432/postgres?sslmode=verify-full&sslrootcert=x",
                       "prefect", "postgresql+asyncpg")
    _, kwargs = PGDialect_asyncpg().create_connect_args(make_url(url))
    assert kwargs["ssl"] == "verify-full"
    params = _parse_connect_dsn_and_args(dsn=None, host=kwargs["host"], port=kwargs["port"], user=kwargs["user"],
                                         password=kwargs["password"], passfile=None, database=kwargs["database"],
                                         ssl=kwargs["ssl"], direct_tls=None, server_settings=None,
                                         target_session_attrs=None, krbsrvname=None, gsslib=None,
                                         service=None, servicefile=None)[1]
    ctx = params.ssl
    assert isinstance(ctx, ssl.SSLContext) and ctx.check_hostname and ctx.verify_mode == ssl.CERT_REQUIRED
    assert [c["subject"] for c in ctx.get_ca_certs()] == [((("commonName", "visitflow test CA"),),)]


def test_prefect_over_tls_is_uvicorn_with_prefects_factory_and_the_pair(tmp_path):
    from visitflow.stack import prefect as pstack

    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    argv, env, health = pstack.server_command(tmp_path, 4243, ui=False, tls=(cert, key))
    assert argv[1:] == ["-m", "uvicorn", "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1",
                        "--port", "4243", "--ssl-certfile", str(cert), "--ssl-keyfile", str(key)]
    assert env["PREFECT__SERVER_FINAL"] == "1" and env["PREFECT_API_URL"] == "https://127.0.0.1:4243/api"
    assert health == "https://127.0.0.1:4243/api/health"
    plain, penv, phealth = pstack.server_command(tmp_path, 4243, ui=False)
    assert plain[1:4] == ["-m", "prefect", "server"] and "PREFECT__SERVER_FINAL" not in penv
    assert phealth.startswith("http://")


def test_lags_leave_out_frames_written_before_the_first_result():
    written = {0: 10.0, 1: 11.0, 2: 12.0, 3: 13.0}
    got = {0: 11.5, 1: 11.5, 2: 12.25, 3: 13.5}      # the flow started after frame 1 was written
    every, steady = measures.lags(written, got)
    assert every == [1.5, 0.5, 0.25, 0.5] and steady == [0.25, 0.5]
    assert measures.lags(written, {}) == ([], [])


def _results():
    p1 = {"startdoc_to_created_s": [0.1] * 5, "create_to_running_s": [0.4] * 5}
    p2 = {"flow_all_s": [1.0, 0.5], "flow_steady_s": [0.5], "frames": 100, "frames_seen": 100, "final": "COMPLETED"}
    p7 = {"runs": 100, "completed": 100, "duplicates": 0, "starts_s": [1.0, 3.0], "makespan_s": 20.0,
          "total_s": 21.0, "retries": 0}
    slower = {"startdoc_to_created_s": [0.3] * 5, "create_to_running_s": [0.4] * 5}
    return {"local": {"P1": p1, "P2": p2, "P7": p7},
            "facility": {"P1": slower, "P2": None, "P7": {**p7, "makespan_s": 30.0}}}


def test_the_table_puts_both_topologies_side_by_side_with_the_facility_over_local_ratio():
    lines = facility.table(_results(), facility.sizes(False))
    p1, p2, p7 = lines[2:]
    assert "0.50s / p95 0.50s" in p1 and "0.70s / p95 0.70s" in p1 and "1.40×" in p1
    assert "p50 0.50s" in p2 and p2.rstrip(" |").endswith("—"), "a failed facility P2 shows as a dash"
    assert "makespan 20.0s = 2.0× ideal (10s)" in p7 and "makespan 30.0s = 3.0× ideal" in p7 and "1.50× makespan" in p7


def test_the_table_keeps_only_the_rows_asked_for():
    lines = facility.table(_results(), facility.sizes(False), only={"P7"})
    assert len(lines) == 3 and lines[2].startswith("| P7 burst")


def test_the_side_measured_first_alternates_row_by_row():
    sides = ["facility", "local"]
    assert [facility.order(sides, row)[0] for row in ("P1", "P2", "P7")] == ["facility", "local", "facility"]
    assert facility.order(["facility"], "P2") == ["facility"]
