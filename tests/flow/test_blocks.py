"""Every visitflow Prefect Block meets Prefect's own block standards
(``prefect.testing.standard_test_suites.BlockStandardTestSuite``), and the per-environment
documents in ``blocks/`` run and save to a real Prefect server and load back."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest
from prefect.blocks.core import Block
from prefect.testing.standard_test_suites import BlockStandardTestSuite

import visitflow
from visitflow.flow import credentials as vf_blocks

pytestmark = pytest.mark.analysts

REPO = Path(__file__).resolve().parents[2]


def visitflow_blocks() -> list[type[Block]]:
    """Every Block subclass defined in the visitflow package (imports every module)."""
    for info in pkgutil.walk_packages(visitflow.__path__, "visitflow."):
        if info.name.endswith("__main__"):
            continue
        importlib.import_module(info.name)

    def walk(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from walk(sub)

    return sorted({c for c in walk(Block) if c.__module__.startswith("visitflow.")}, key=lambda c: c.__name__)


def test_the_blocks_found_include_scoped_credentials():
    assert vf_blocks.ScopedCredentials in visitflow_blocks()


@pytest.fixture
def repository_logo(monkeypatch):
    """The logo URL is this repository's ``blocks/logo.png`` as its host serves it; this
    machine has no route to that host, so the suite's download is answered from the file
    the URL names (the one stand-in here)."""
    import prefect.testing.standard_test_suites.blocks as suite

    real = suite.urlopen

    def urlopen(url, *args, **kwargs):
        if str(url) == vf_blocks.LOGO_URL:
            return open(REPO / vf_blocks.LOGO_PATH, "rb")
        return real(url, *args, **kwargs)

    monkeypatch.setattr(suite, "urlopen", urlopen)


@pytest.mark.usefixtures("repository_logo")
class TestVisitflowBlocks(BlockStandardTestSuite):
    @pytest.fixture(params=visitflow_blocks(), ids=lambda c: c.__name__)
    def block(self, request):
        return request.param


def test_logo_url_names_a_file_in_the_repository():
    assert vf_blocks.LOGO_URL.endswith("/" + vf_blocks.LOGO_PATH) and (REPO / vf_blocks.LOGO_PATH).is_file()


def _run(script: str, *args, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "blocks" / script), *args], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=180)


def _load(prefect_stack, name: str) -> dict:
    doc = prefect_stack.api.request("GET", f"/block_types/slug/visitflow-scoped-credentials/block_documents/name/{name}",
                                    params={"include_secrets": "false"})
    return doc["data"]


@pytest.mark.e2e
def test_blocks_local_saves_what_visitflow_up_saves(prefect_stack, idp, tiled_server):
    out = _run("local.py", "--issuer", idp.issuer, "--raw-uri", tiled_server.uri, "--name", "local-check",
               env=prefect_stack.env)
    assert out.returncode == 0 and "saved ScopedCredentials 'local-check'" in out.stdout, out.stderr
    saved, used = _load(prefect_stack, "local-check"), _load(prefect_stack, "visitflow")  # the fixture's, via configure
    assert saved == used
    assert saved["issuer"] == idp.issuer and saved["raw_uri"] == tiled_server.uri
    assert saved["client_secret"] is None and saved["client_secret_env"] == "VISITFLOW_CLIENT_SECRET"
    assert saved["grant_scope"] == "run" and saved["raw_template"] == "raw/{visit}/{run}"


@pytest.mark.e2e
def test_blocks_kubernetes_saves_the_facility_document(prefect_stack):
    env = {**prefect_stack.env, "VISITFLOW_ISSUER": "https://token-service.example",
           "VISITFLOW_TILED_URI": "https://tiled.example", "VISITFLOW_INSTRUMENT": "i22"}
    shown = _run("kubernetes.py", "--print", env=env)
    assert shown.returncode == 0, shown.stderr
    doc = json.loads(shown.stdout)
    out = _run("kubernetes.py", "--name", "k8s-check", env=env)
    assert out.returncode == 0, out.stderr
    saved = _load(prefect_stack, "k8s-check")
    for key in ("issuer", "raw_uri", "raw_template", "grant_scope", "client_secret_env"):
        assert saved[key] == doc[key], key
    assert saved["grant_scope"] == "run" and saved["raw_template"] == "i22/{proposal}/{visit}/{run}"
    assert saved["client_secret"] is None, "the facility's secret stays in the Kubernetes Secret"
    refused = _run("kubernetes.py", "--print", env={k: v for k, v in env.items() if k != "VISITFLOW_TILED_URI"})
    assert refused.returncode != 0 and "VISITFLOW_TILED_URI" in refused.stderr


def test_blocks_definitions_build_valid_documents():
    spec = importlib.util.spec_from_file_location("blocks_kubernetes", REPO / "blocks" / "kubernetes.py")
    k8s = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(k8s)
    need = {"VISITFLOW_ISSUER": "https://kc/realms/facility", "VISITFLOW_TILED_URI": "https://t"}
    block = k8s.definition({**need, "VISITFLOW_GRANT_SCOPE": "visit", "VISITFLOW_INSTRUMENT": "i22"})
    assert block.grant_scope == "visit" and block.raw_template == "i22/{proposal}/{visit}/{run}"
    with pytest.raises(SystemExit, match="VISITFLOW_ISSUER"):
        k8s.definition({})


def test_blocks_kubernetes_defaults_format_with_what_a_flow_run_has():
    """The shipped defaults, through RunAccess.raw_path's own call: the old default
    ``{instrument}/...`` raised KeyError in every flow run, when a run carried no instrument."""
    from visitflow.flow.credentials import RunAccess

    k8s = _module("kubernetes.py")
    need = {"VISITFLOW_ISSUER": "https://token-service.example", "VISITFLOW_TILED_URI": "https://t"}

    def raw_path(block, visit="cm12345-1", run="r1", instrument=None):
        return RunAccess(visit, run, "saxs_average", None, None, None, None, block.layout(),
                         instrument=instrument).raw_path

    plain = k8s.definition(need)
    assert plain.grant_scope == "run", "token-service mode mints per-run scopes"
    assert raw_path(plain) == "raw/cm12345-1/r1"
    assert raw_path(k8s.definition({**need, "VISITFLOW_INSTRUMENT": "i22"})) == "i22/cm12345/cm12345-1/r1"
    every_beamline = k8s.definition({**need, "VISITFLOW_RAW_TEMPLATE": "{instrument}/{proposal}/{visit}/{run}"})
    assert raw_path(every_beamline, instrument="b21") == "b21/cm12345/cm12345-1/r1"
    with pytest.raises(SystemExit, match="instrument"):
        k8s.definition({**need, "VISITFLOW_RAW_TEMPLATE": "{beamline}/{visit}/{run}"})


def _module(name: str):
    spec = importlib.util.spec_from_file_location(f"blocks_{name[:-3]}", REPO / "blocks" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
