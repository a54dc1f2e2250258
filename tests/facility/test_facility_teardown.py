"""The facility suite's last module: deployments/cluster/down.sh by its record (marker
``facility``).  Named to run after test_facility_cluster.py and test_facility_story.py, which
share the cluster it tears down."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.fixtures.cluster_fixtures import CLUSTER_DIR

pytestmark = pytest.mark.facility


def test_down_sh_undoes_everything_up_sh_recorded(kube):
    """down.sh by the record: no process, bridge, kube-proxy/CNI chain, mount or state left."""
    state = kube.kubeconfig.parent
    record = [line.split() for line in (state / "record").read_text().splitlines()]
    pids = [int(r[1]) for r in record if r[0] == "pid"]
    assert len(pids) >= 7                      # etcd, apiserver, controller-manager, scheduler, containerd, kubelet, kube-proxy
    assert Path("/sys/class/net/vfk8s0").exists()
    subprocess.run(["bash", str(CLUSTER_DIR / "down.sh")], check=True, capture_output=True, timeout=300)
    assert not [p for p in pids if Path(f"/proc/{p}").exists() and "zombie" not in Path(f"/proc/{p}/status").read_text()]
    assert not Path("/sys/class/net/vfk8s0").exists()
    rules = subprocess.run(["iptables-save"], capture_output=True, text=True, check=True).stdout
    assert "KUBE-SERVICES" not in rules and "visitflow-pods" not in rules
    assert str(state) not in Path("/proc/mounts").read_text()
    assert not state.exists()
