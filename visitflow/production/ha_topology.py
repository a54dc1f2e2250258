"""Prefect's highly available topology, run for real on one machine (deployments/ha/).

What a facility runs, on hosts of their own — here network namespaces (``ip netns``) joined
by veth pairs to one bridge, each with its own address::

    control host (the root namespace, bridge address .1)
        PostgreSQL 15 (127.0.0.1), Redis (127.0.0.1),
        Prefect API server A and B (``prefect server start --no-services``, 127.0.0.1),
        nginx (the load balancer, on .1) in front of A and B,
        one ``prefect server services start`` process (scheduler, triggers, foreman, ...)
    data host   (netns ``<prefix>-data``, .10): the token service (dev IdP) and Tiled
    worker hosts (netns ``<prefix>-w1`` / ``-w2``, .21 / .22): a warm ``visitflow`` worker each

Every Prefect process of the stack shares the same settings (:func:`prefect_ha_env`):
PostgreSQL, Redis messaging and cache (prefect-redis), Redis causal ordering and lease
storage, Docket on Redis — what Prefect's "scale self-hosted Prefect" guide asks for.
Workers and flow runs reach Prefect only through nginx, so killing an API server is what a
client sees when a pod dies behind a Service.

Ownership and clean-up: everything started is a process group (visitflow.stack.services), every
pgid and namespace is written to ``<state>/topology.json`` as soon as it exists, and
:func:`teardown` kills the groups, kills whatever is left in the namespaces
(``ip netns pids``), deletes the namespaces and the bridge, and stops PostgreSQL — from that
file alone, so ``deployments/ha/down.sh`` cleans up after a run that crashed half-way.

Needs root (netns, veth), the PostgreSQL server binaries, redis-server and nginx
(``.ci/install-redis``, ``.ci/install-nginx``).  Used by tests/fixtures/ha_fixtures.py, the benchmark
(benchmarks/ha.py) and deployments/ha/up.sh.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import ServiceFailed
from ..stack.services import Service, free_port, start_service, stop_group
from .nginx import http_preamble, upstream_servers
from ..core.prefect_api import PrefectAPI
from ..stack import prefect as pstack
from .ha_recovery import deploy_probe, ensure_recovery_automation

__all__ = [
    'PREFIX', 'Host', 'HATopology', 'prefect_ha_env', 'nginx_config', 'missing_parts', 'teardown',
    'teardown_all', 'main',
]

#: Namespaces, the bridge and state directories of a topology are named ``<PREFIX><tag>...``.
PREFIX = "vfha"
REPO = pstack.REPO
IDP_CONFIG = REPO / "deployments" / "idp.yaml"
DEV_CLIENT_SECRET = "visitflow-dev-secret"
ADMIN_SECRET = "admin-dev-secret"


@dataclass
class Host:
    """One host of the topology: a network namespace (``None``: the root namespace)."""

    name: str
    address: str
    netns: str | None = None
    veth: str | None = None      # the bridge-side end (taking it down cuts the host off)

    def wrap(self, argv: list[str]) -> list[str]:
        return argv if self.netns is None else ["ip", "netns", "exec", self.netns, *argv]


def _sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(argv), capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise ServiceFailed(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def missing_parts() -> list[str]:
    """What this machine lacks to run the topology (empty: it can)."""
    out = []
    if os.geteuid() != 0:
        out.append("root (ip netns, veth)")
    for tool in ("ip", "redis-server", "nginx"):
        if not (shutil.which(tool) or Path(f"/usr/sbin/{tool}").exists()):
            out.append(tool)
    if not list(Path("/usr/lib/postgresql").glob("*/bin/initdb")):
        out.append("PostgreSQL server binaries")
    try:
        import prefect_redis  # noqa: F401
    except ImportError:
        out.append("prefect-redis")
    return out


def prefect_ha_env(api_url: str, home: Path, *, database_url: str, redis_port: int,
                   redis_host: str = "127.0.0.1") -> dict[str, str]:
    """Settings shared by every Prefect process of the HA stack (servers, services, CLI,
    workers, flow runs): Prefect's documented multi-server configuration."""
    return pstack.prefect_env(
        api_url, home,
        PREFECT_API_DATABASE_CONNECTION_URL=database_url,
        PREFECT_SERVER_DATABASE_MIGRATE_ON_START="false",       # migrated once, before the servers
        PREFECT_MESSAGING_BROKER="prefect_redis.messaging",
        PREFECT_MESSAGING_CACHE="prefect_redis.messaging",
        PREFECT_SERVER_EVENTS_CAUSAL_ORDERING="prefect_redis.ordering",
        PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE="prefect_redis.lease_storage",
        PREFECT_REDIS_MESSAGING_HOST=redis_host,
        PREFECT_REDIS_MESSAGING_PORT=str(redis_port),
        PREFECT_SERVER_DOCKET_URL=f"redis://{redis_host}:{redis_port}/1",
        PREFECT_UI_ENABLED="false",
        # Flow runs emit a heartbeat every 30 s (Prefect's minimum): the live-recovery automation
        # (visitflow/production/ha_recovery.py) acts when they stop.
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY="30",
    )


def nginx_config(state: Path, listen: str, upstreams: list[str]) -> str:
    """nginx as Prefect's load balancer: round robin, a dead upstream is skipped for 2 s
    after one failed connect; websockets (events in/out) pass through."""
    return http_preamble(state, state / "logs" / "nginx-error.log", user_root=True) + f"""\
    client_max_body_size 50m;
    map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
    upstream prefect_api {{
{upstream_servers(upstreams)}
        keepalive 32;
    }}
    server {{
        listen {listen};
        location / {{
            proxy_pass http://prefect_api;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $host;
            proxy_connect_timeout 2s;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
            proxy_next_upstream error timeout http_502 http_503;
        }}
    }}
}}
"""


@dataclass
class HATopology:
    """Bring the topology up (:meth:`up`) and down (:meth:`down`); see the module docstring."""

    state: Path
    workers: int = 2
    tag: str = field(default_factory=lambda: f"{random.randrange(16**4):04x}")
    subnet: int = field(default_factory=lambda: random.randrange(10, 250))
    services_enabled: bool = True
    record: dict = field(default_factory=lambda: {"pgids": {}, "netns": [], "links": []})
    services: dict[str, Service] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.state = Path(self.state)
        routes = _sh("ip", "-4", "route", check=False).stdout if shutil.which("ip") else ""
        while not self.record.get("tag") and f"10.{self.subnet // 100 + 200}.{self.subnet % 100}." in routes:
            self.subnet = random.randrange(10, 250)    # that /24 is taken here: pick another
        self.net = f"10.{self.subnet // 100 + 200}.{self.subnet % 100}"   # 10.20x.y.0/24
        self.bridge = f"{PREFIX}{self.tag}br"
        self.control = Host("control", f"{self.net}.1")
        self.data = Host("data", f"{self.net}.10", f"{PREFIX}{self.tag}-data", f"{PREFIX}{self.tag}d")
        self.worker_hosts = [Host(f"w{i}", f"{self.net}.{20 + i}", f"{PREFIX}{self.tag}-w{i}", f"{PREFIX}{self.tag}w{i}")
                             for i in range(1, self.workers + 1)]
        self.ports = {"pg": free_port(), "redis": free_port(), "api_a": free_port(), "api_b": free_port(),
                      "lb": free_port(), "idp": 8400, "tiled": 8401, "worker_health": 8402}

    @classmethod
    def attach(cls, state: Path) -> "HATopology":
        """A running topology, from its ``topology.json`` (its services as pgids only: a test
        may kill or restart them by name)."""
        record = json.loads((Path(state) / "topology.json").read_text())
        parts = record["hosts"][2]["address"].split(".")[:3]
        topo = cls(Path(state), workers=len(record["hosts"]) - 2, tag=record["tag"],
                   subnet=(int(parts[1]) - 200) * 100 + int(parts[2]), record=record)
        topo.ports = record["ports"]
        topo.database_url = record["database_url"]
        return topo

    def kill(self, name: str) -> None:
        """SIGKILL one service's whole process group (no clean shutdown)."""
        pgid = self.record["pgids"][name]
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        svc = self.services.get(name)
        if svc is not None and svc.process is not None:
            svc.process.wait(10)

    def alive(self, name: str) -> bool:
        """Whether anything of that service's process group is left."""
        svc = self.services.get(name)
        if svc is not None and svc.process is not None and svc.process.poll() is not None:
            return False
        try:
            os.killpg(self.record["pgids"][name], 0)
            return True
        except ProcessLookupError:
            return False

    def kill_host(self, host: Host) -> None:
        """SIGKILL every process on a host (its worker, the zygote, every flow-run child)."""
        _kill_netns(host.netns)

    # ------------------------------------------------------------------ addresses
    @property
    def api_url(self) -> str:
        """The load balancer: what every client uses."""
        return f"http://{self.control.address}:{self.ports['lb']}/api"

    def server_url(self, which: str) -> str:
        return f"http://127.0.0.1:{self.ports['api_' + which]}/api"

    @property
    def issuer(self) -> str:
        return f"http://{self.data.address}:{self.ports['idp']}"

    @property
    def tiled_uri(self) -> str:
        return f"http://{self.data.address}:{self.ports['tiled']}"

    @property
    def env(self) -> dict[str, str]:
        return prefect_ha_env(self.api_url, self.state / "prefect", database_url=self.database_url,
                              redis_port=self.ports["redis"])

    def _save(self) -> None:
        self.record.update(tag=self.tag, bridge=self.bridge, state=str(self.state), pg_dir=str(self.state / "pg"),
                           api_url=self.api_url, issuer=self.issuer, tiled_uri=self.tiled_uri,
                           hosts=[asdict(h) for h in (self.control, self.data, *self.worker_hosts)],
                           ports=self.ports)
        (self.state / "topology.json").write_text(json.dumps(self.record, indent=1))

    def _start(self, name: str, host: Host, argv: list[str], *, env: dict | None = None,
               health_url: str | None = None, cwd: Path | None = None) -> Service:
        svc = start_service(name, host.wrap(argv), log_dir=self.state / "logs", env=env, health_url=health_url,
                            cwd=cwd)
        self.services[name] = svc
        self.record["pgids"][name] = svc.pid
        self._save()
        return svc

    # ------------------------------------------------------------------ network
    def _network_up(self) -> None:
        _sh("ip", "link", "add", self.bridge, "type", "bridge")
        self.record["links"].append(self.bridge)
        self._save()
        _sh("ip", "addr", "add", f"{self.control.address}/24", "dev", self.bridge)
        _sh("ip", "link", "set", self.bridge, "up")
        for host in (self.data, *self.worker_hosts):
            _sh("ip", "netns", "add", host.netns)
            self.record["netns"].append(host.netns)
            self._save()
            peer = f"{host.veth}p"
            _sh("ip", "link", "add", host.veth, "type", "veth", "peer", "name", peer)
            self.record["links"].append(host.veth)
            _sh("ip", "link", "set", peer, "netns", host.netns)
            _sh("ip", "link", "set", host.veth, "master", self.bridge)
            _sh("ip", "link", "set", host.veth, "up")
            ns = ("ip", "netns", "exec", host.netns)
            _sh(*ns, "ip", "link", "set", "lo", "up")
            _sh(*ns, "ip", "link", "set", peer, "name", "eth0")
            _sh(*ns, "ip", "addr", "add", f"{host.address}/24", "dev", "eth0")
            _sh(*ns, "ip", "link", "set", "eth0", "up")
            _sh(*ns, "ip", "route", "add", "default", "via", self.control.address)

    def cut(self, host: Host) -> None:
        """Cut a host off the network (its link to the bridge goes down)."""
        _sh("ip", "link", "set", host.veth, "down")

    def heal(self, host: Host) -> None:
        _sh("ip", "link", "set", host.veth, "up")

    def host_of_pid(self, pid: int) -> Host | None:
        """The worker/data host whose namespace runs ``pid``."""
        for host in (self.data, *self.worker_hosts):
            pids = _sh("ip", "netns", "pids", host.netns, check=False).stdout.split()
            if str(pid) in pids:
                return host
        return None

    # ------------------------------------------------------------------ parts
    def _postgres(self) -> None:
        pg_dir = self.state / "pg"
        self.record["pg_dir"] = str(pg_dir)
        self._save()
        url = _sh("bash", str(REPO / "deployments/postgres/start-local.sh"), str(pg_dir), str(self.ports["pg"])).stdout.strip()
        _sh("psql", "-q", url, "-c", "CREATE DATABASE prefect")
        self.database_url = "postgresql+asyncpg://" + url.removeprefix("postgresql://").rsplit("/", 1)[0] + "/prefect"
        self.record["database_url"] = self.database_url

    def _redis(self) -> Service:
        return self._start("redis", self.control, [
            shutil.which("redis-server") or "/usr/bin/redis-server", "--bind", "127.0.0.1", "--port",
            str(self.ports["redis"]), "--save", "", "--appendonly", "no", "--dir", str(self.state)])

    def api_server(self, which: str) -> Service:
        """Start (or restart) API server ``a``/``b``: ``prefect server start --no-services``."""
        port = self.ports["api_" + which]
        argv = [sys.executable, "-m", "prefect", "server", "start", "--no-services", "--host", "127.0.0.1",
                "--port", str(port)]
        return self._start(f"prefect-api-{which}", self.control, argv, env=self.env,
                           health_url=f"http://127.0.0.1:{port}/api/health")

    def services_process(self) -> Service:
        """Start (or restart) the one ``prefect server services start`` process."""
        return self._start("prefect-services", self.control,
                           [sys.executable, "-m", "prefect", "server", "services", "start"], env=self.env)

    def _nginx(self) -> Service:
        (self.state / "nginx-tmp").mkdir(parents=True, exist_ok=True)
        conf = self.state / "nginx.conf"
        conf.write_text(nginx_config(self.state, f"{self.control.address}:{self.ports['lb']}",
                                     [f"127.0.0.1:{self.ports['api_a']}", f"127.0.0.1:{self.ports['api_b']}"]))
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        return self._start("nginx", self.control, [nginx, "-c", str(conf), "-p", str(self.state), "-g", "daemon off;"],
                           health_url=f"{self.api_url}/health")

    def _data_host(self) -> None:
        from ..core.tiled_admin import admin_auth, ensure_visits

        py = [sys.executable, "-m", "visitflow.cli"]
        idp = self._start("idp", self.data, [*py, "idp", "--config", str(IDP_CONFIG), "--host", self.data.address,
                                             "--port", str(self.ports["idp"]), "--keys-dir",
                                             str(self.state / "idp-keys"), "--log-level", "warning"],
                          health_url=f"{self.issuer}/health")
        idp.wait_ready(60)
        tiled = self._start("tiled", self.data, [*py, "tiled", "serve", "--issuer", self.issuer, "--state-dir",
                                                 str(self.state / "tiled"), "--host", self.data.address, "--port",
                                                 str(self.ports["tiled"]), "--log-level", "warning"],
                            health_url=f"{self.tiled_uri}/api/v1/")
        tiled.wait_ready(120)
        ensure_visits(self.tiled_uri, admin_auth(self.issuer, "visitflow-admin", ADMIN_SECRET), ("a1", "a2"))

    def worker(self, host: Host, *, name: str | None = None) -> Service:
        """Start (or restart) the warm ``visitflow`` worker on ``host``."""
        name = name or f"worker-{host.name}"
        port = self.ports["worker_health"]
        argv, wenv, _ = pstack.worker_command(
            self.env, health_port=port, name=name, client_secret=DEV_CLIENT_SECRET,
            extra_env={"PREFECT_WORKER_WEBSERVER_HOST": host.address})
        return self._start(name, host, argv, env=wenv, cwd=REPO, health_url=f"http://{host.address}:{port}/health")

    # ------------------------------------------------------------------ whole
    def up(self, *, post_limit: int = 4, pool_limit: int | None = None) -> "HATopology":
        missing = missing_parts()
        if missing:
            raise ServiceFailed(f"the HA topology needs: {', '.join(missing)}")
        self.state.mkdir(parents=True, exist_ok=True)
        os.chmod(self.state, 0o755)
        self._save()
        try:
            self._network_up()
            self._postgres()
            self._redis().wait_ready(5)
            pstack.run_cli(["server", "database", "upgrade", "-y"], self.env)
            # One after the other: two servers registering Prefect's block schemas at the same
            # moment race on a unique index (UniqueViolationError in the second one's log).
            for which in ("a", "b"):
                self.api_server(which).wait_ready(180)
            self._nginx().wait_ready(30)
            if self.services_enabled:
                self.services_process()
            self._data_host()
            pstack.configure(self.env, issuer=self.issuer, tiled_uri=self.tiled_uri, post_limit=post_limit)
            with PrefectAPI(self.api_url) as api:
                ensure_recovery_automation(api)
                deploy_probe(api)
            if pool_limit:
                pstack.run_cli(["work-pool", "set-concurrency-limit", pstack.POOL, str(pool_limit)], self.env)
            workers = [self.worker(h) for h in self.worker_hosts]
            for w in workers:
                w.wait_ready(120)
            if self.services_enabled:
                svc = self.services["prefect-services"]
                if svc.process.poll() is not None:
                    raise ServiceFailed(f"prefect services exited:\n{svc.log_tail()}")
        except BaseException:
            self.down()
            raise
        return self

    def down(self) -> None:
        teardown(self.state)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.down()


def _kill_netns(netns: str) -> None:
    pids = _sh("ip", "netns", "pids", netns, check=False).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def teardown(state: Path) -> None:
    """Stop everything ``<state>/topology.json`` records (safe to call twice, or after a crash)."""
    path = Path(state) / "topology.json"
    if not path.exists():
        return
    record = json.loads(path.read_text())
    for pgid in reversed(list(record.get("pgids", {}).values())):
        stop_group(pgid, timeout=5)
    for netns in record.get("netns", []):
        _kill_netns(netns)
        _sh("ip", "netns", "del", netns, check=False)
    for link in record.get("links", []):
        _sh("ip", "link", "del", link, check=False)
    pg_dir = record.get("pg_dir")
    if pg_dir and Path(pg_dir, "data").exists():
        _sh("bash", str(REPO / "deployments/postgres/stop-local.sh"), pg_dir, check=False)
    path.rename(path.with_suffix(".down.json"))


def teardown_all(root: Path = Path("/tmp")) -> list[str]:
    """Tear down every topology under ``root`` (``<root>/vfha-*``), then any namespace or link
    named ``vfha…`` that is left (a run killed before it wrote its record)."""
    done = []
    for state in sorted(root.glob(f"{PREFIX}-*")):
        if (state / "topology.json").exists():
            teardown(state)
            done.append(str(state))
    for netns in _sh("ip", "netns", "list", check=False).stdout.split("\n"):
        name = netns.split(" ")[0]
        if name.startswith(PREFIX):
            _kill_netns(name)
            _sh("ip", "netns", "del", name, check=False)
            done.append(name)
    for line in _sh("ip", "-o", "link", "show", check=False).stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if name.startswith(PREFIX):
            _sh("ip", "link", "del", name, check=False)
            done.append(name)
    return done


def main(argv: list[str] | None = None) -> int:
    """``python -m visitflow.production.ha_topology up|down|down-all [--state DIR]``."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m visitflow.production.ha_topology", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["up", "down", "down-all"])
    p.add_argument("--state", default=None, help="state directory (default /tmp/vfha-<tag>)")
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)
    if args.action == "down-all":
        print("\n".join(teardown_all()) or "nothing to tear down")
        return 0
    if args.action == "down":
        if not args.state:
            p.error("down needs --state (or use down-all)")
        teardown(Path(args.state))
        return 0
    topo = HATopology(Path("/tmp/placeholder"), workers=args.workers)
    topo.state = Path(args.state or f"/tmp/{PREFIX}-{topo.tag}")
    t0 = time.monotonic()
    topo.up()
    print(json.dumps({"state": str(topo.state), "api_url": topo.api_url, "issuer": topo.issuer,
                      "tiled_uri": topo.tiled_uri, "database_url": topo.database_url,
                      "hosts": {h.name: h.address for h in (topo.control, topo.data, *topo.worker_hosts)},
                      "up_seconds": round(time.monotonic() - t0, 1)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
