"""``.ci/run``'s background builds (tests/fixtures/background_builds.py, .ci/background-builds).

Why: a build in the background must neither hide a failure (a test that needs it fails with
its log) nor be used half-made (a test waits for its status file), and no apt-get may run
beside it (the dpkg lock).  Pure logic and file reading: no builds, no servers.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.fixtures import background_builds as bb

ROOT = Path(__file__).resolve().parents[1]


def test_without_the_variable_nothing_waits(monkeypatch):
    monkeypatch.delenv(bb.BUILDS_ENV, raising=False)
    assert bb.wait_for_build("opa") is None
    assert bb.build_output("opa") is None


def test_a_build_that_was_not_started_is_not_waited_for(monkeypatch, tmp_path):
    monkeypatch.setenv(bb.BUILDS_ENV, str(tmp_path))
    assert bb.wait_for_build("opa") is None


def test_a_running_build_is_waited_for_then_its_output_read(monkeypatch, tmp_path):
    monkeypatch.setenv(bb.BUILDS_ENV, str(tmp_path))
    (tmp_path / "opa.log").write_text("building\n")

    def finish():
        time.sleep(0.5)
        (tmp_path / "opa.out").write_text("/cache/opa/v1.22.3/opa\n")
        (tmp_path / "opa.rc").write_text("0\n")

    threading.Thread(target=finish).start()
    began = time.monotonic()
    assert bb.build_output("opa") == "/cache/opa/v1.22.3/opa"
    assert time.monotonic() - began >= 0.4


def test_a_failed_build_fails_with_its_log(monkeypatch, tmp_path):
    monkeypatch.setenv(bb.BUILDS_ENV, str(tmp_path))
    (tmp_path / "kubernetes.log").write_text("go: compile error in kube-apiserver\n")
    (tmp_path / "kubernetes.rc").write_text("1\n")
    with pytest.raises(pytest.fail.Exception, match="(?s)kubernetes failed.*compile error in kube-apiserver"):
        bb.wait_for_build("kubernetes")


def _item(name, markers=(), fixtures=(), module=None):
    return SimpleNamespace(name=name, fixturenames=list(fixtures), module=module,
                           get_closest_marker=lambda m: m if m in markers else None)


def test_images_and_cluster_users_run_last_in_their_order_modules_whole(monkeypatch, tmp_path):
    kustomize = SimpleNamespace(kubectl_path=object())
    facility = SimpleNamespace(cluster_cache=object())
    items = [_item("core"), _item("facility", markers=("facility",), module=facility),
             _item("facility-images", markers=("facility",), fixtures=("images",), module=facility),
             _item("kustomize", module=kustomize),
             _item("flow"), _item("images", markers=("images",), fixtures=("images",)), _item("tiled")]
    monkeypatch.delenv(bb.BUILDS_ENV, raising=False)
    same = list(items)
    bb.pytest_collection_modifyitems(None, same)
    assert [i.name for i in same] == [i.name for i in items], "a developer's run keeps file order"
    monkeypatch.setenv(bb.BUILDS_ENV, str(tmp_path))
    bb.pytest_collection_modifyitems(None, items)
    assert [i.name for i in items] == ["core", "flow", "tiled", "images", "facility", "facility-images", "kustomize"]


def _lines(path: str) -> list[str]:
    return [line.split("#", 1)[0].strip() for line in (ROOT / path).read_text().splitlines()]


def test_ci_run_installs_every_package_before_starting_the_builds():
    lines = _lines(".ci/run")
    started = next(i for i, line in enumerate(lines) if ".ci/background-builds" in line)
    apt_installers = [i for i, line in enumerate(lines)
                      if line.startswith("bash .ci/install-") and line.split()[1] != ".ci/install-blueapi"]
    assert apt_installers and max(apt_installers) < started
    assert "bash .ci/install-kubernetes --packages" in lines
    assert not any(line.startswith("bash .ci/install-kubernetes") and "--packages" not in line for line in lines), \
        "the Kubernetes build runs in the background (.ci/background-builds), not in .ci/run"
    assert not any("apt-get" in line for line in _lines(".ci/background-builds"))
    assert "bash .ci/install-kubernetes --build" in (ROOT / ".ci/background-builds").read_text()


def test_install_blueapi_needs_no_apt():
    """.ci/run runs it beside the background builds: it must not take the dpkg lock."""
    assert "apt-get" not in (ROOT / ".ci/install-blueapi").read_text()
