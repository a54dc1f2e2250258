"""Every file under deployments/ and blocks/ is loaded *as shipped* by some test.

:data:`SHIPPED` maps each file to the tests that load it, unchanged, through the loader a
site would use (the realm through Keycloak's import and ``identity_problems``, the token
service's config through ``IdPConfig.load``, block scripts through their ``definition()``
with a stated environment, the trigger's settings through ``load_settings``, rego through
``opa test`` and a real OPA, manifests through their validators, shell scripts through
``bash -n`` and, where cheap, a run).  Tests named here that live in this module run in the
fast tier; the others are the suites that start the real servers.

The guards: a new file under deployments/ or blocks/ that is not in :data:`SHIPPED` fails
:func:`test_every_shipped_file_is_covered`; a listed test that does not exist, or whose
module does not name the file, fails :func:`test_each_listed_test_exists_and_names_its_file`.
(Tests of other modules that *rewrite* a shipped file for their own set-up do not count:
the ones listed here load it unchanged.)
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
HERE = "tests/production/test_shipped_files.py"

#: file -> tests that load it as shipped ("path::test" ids).
SHIPPED: dict[str, tuple[str, ...]] = {
    "blocks/README.md": (f"{HERE}::test_readmes_name_only_files_that_exist",),
    "blocks/kubernetes.py": (f"{HERE}::test_block_scripts_build_their_documents_from_a_stated_env",
                             "tests/flow/test_blocks.py::test_blocks_kubernetes_saves_the_facility_document"),
    "blocks/local.py": (f"{HERE}::test_block_scripts_build_their_documents_from_a_stated_env",
                        "tests/flow/test_blocks.py::test_blocks_local_saves_what_visitflow_up_saves"),
    "blocks/logo.png": (f"{HERE}::test_logo_is_a_png", "tests/flow/test_blocks.py::test_logo_url_names_a_file_in_the_repository"),
    "deployments/blueapi/visitflow_example_plans.py": (
        f"{HERE}::test_python_files_compile",
        "tests/trigger/test_blueapi.py::test_alice_task_triggers_live_and_post_with_her_rights"),
    "deployments/blueapi/visitflow_detector_plans.py": (
        f"{HERE}::test_python_files_compile",
        "tests/trigger/test_blueapi_detector.py::test_detector_hdf5_through_blueapi_live_follows_and_post_equals_numpy",
        "tests/trigger/test_blueapi_detector.py::test_a_detector_file_outside_the_visit_directory_is_refused"),
    "deployments/blueapi/visitflow-trigger.yaml": (f"{HERE}::test_trigger_settings_load_through_the_hook",),
    "deployments/ha/README.md": (f"{HERE}::test_readmes_name_only_files_that_exist",),
    "deployments/ha/up.sh": (f"{HERE}::test_shell_scripts_parse", f"{HERE}::test_ha_scripts_run_their_module"),
    "deployments/ha/down.sh": (f"{HERE}::test_shell_scripts_parse", f"{HERE}::test_ha_scripts_run_their_module"),
    "deployments/idp.yaml": (f"{HERE}::test_token_service_configs_load",),
    "deployments/token-service.yaml": (f"{HERE}::test_token_service_configs_load",
                                       "tests/token_service/test_token_service_config.py::test_shipped_config_loads_with_secrets_from_the_environment",
                                       "tests/ops/test_token_replicas.py::test_a_replica_killed_during_a_burst_of_exchanges_refuses_no_exchange"),
    "deployments/keycloak/realm-facility.json": (
        f"{HERE}::test_the_facility_realm_is_fit_as_shipped",
        "tests/production/test_keycloak_production.py::test_production_keycloak_imports_the_shipped_facility_realm"),
    "deployments/keycloak/realm.json": (
        "tests/production/test_keycloak_identity_realm.py::test_the_shipped_facility_realm_is_the_identity_realm_of_the_shipped_one",
        "tests/token_service/test_keycloak.py"),
    "deployments/keycloak/fetch.sh": (f"{HERE}::test_shell_scripts_parse",
                                      "tests/production/test_keycloak_production.py::test_production_keycloak_imports_the_shipped_facility_realm"),
    "deployments/keycloak/build-production.sh": (
        f"{HERE}::test_shell_scripts_parse",
        "tests/production/test_keycloak_production.py::test_production_keycloak_imports_the_shipped_facility_realm"),
    "deployments/keycloak/start.sh": (f"{HERE}::test_shell_scripts_parse", "tests/token_service/test_keycloak.py"),
    "deployments/images/README.md": (f"{HERE}::test_readmes_name_only_files_that_exist",),
    "deployments/images/build.sh": (f"{HERE}::test_shell_scripts_parse", "tests/images/test_images.py::test_build_sh_is_a_no_op_when_warm_and_names_every_image"),
    "deployments/images/runtime.Containerfile": ("tests/images/test_images.py::test_build_sh_is_a_no_op_when_warm_and_names_every_image", "tests/production/test_production_kubernetes.py::test_flow_image_is_a_pinned_non_root_compiled_image"),
    "deployments/images/flows.Containerfile": ("tests/images/test_images.py::test_build_sh_is_a_no_op_when_warm_and_names_every_image", "tests/production/test_production_kubernetes.py::test_flow_image_is_a_pinned_non_root_compiled_image",
        "tests/images/test_images.py::test_flow_image_runs_saxs_average_post_and_equals_numpy"),
    "deployments/images/idp.Containerfile": ("tests/images/test_images.py::test_build_sh_is_a_no_op_when_warm_and_names_every_image", "tests/images/test_images.py::test_idp_image_answers_its_health_check_and_issues_tokens"),
    "deployments/images/tiled.Containerfile": ("tests/images/test_images.py::test_build_sh_is_a_no_op_when_warm_and_names_every_image", "tests/images/test_images.py::test_tiled_image_answers_its_health_check_with_our_auth"),
    "deployments/images/opa.Containerfile": ("tests/images/test_images.py::test_build_sh_is_a_no_op_when_warm_and_names_every_image", "tests/images/test_images.py::test_opa_image_answers_its_health_check"),
    "deployments/images/blueapi.Containerfile": ("tests/images/test_images.py::test_build_sh_is_a_no_op_when_warm_and_names_every_image", "tests/images/test_images.py::test_blueapi_image_starts_with_the_hook_and_the_plans", f"{HERE}::test_the_blueapi_image_pins_the_versions_install_blueapi_pins"),
    "deployments/images/postgres.Containerfile": ("tests/images/test_images.py::test_build_sh_is_a_no_op_when_warm_and_names_every_image", "tests/images/test_images.py::test_postgres_image_makes_each_services_role_and_database_from_its_url"),
    "deployments/images/postgres-entrypoint": ("tests/images/test_images.py::test_postgres_image_makes_each_services_role_and_database_from_its_url",),
    "deployments/images/redis.Containerfile": ("tests/images/test_images.py::test_build_sh_is_a_no_op_when_warm_and_names_every_image", "tests/images/test_images.py::test_redis_image_answers_as_base_services_redis_yaml_runs_it"),
    "deployments/images/probe": ("tests/images/test_images.py::test_idp_image_answers_its_health_check_and_issues_tokens",),
    "deployments/kubernetes/README.md": (f"{HERE}::test_readmes_name_only_files_that_exist",
                                         "tests/production/test_production_kubernetes.py::test_readme_shows_the_pool_command"),
    "deployments/kubernetes/base/kustomization.yaml": ("tests/production/test_kustomize.py::test_every_manifest_file_is_reached_by_the_overlays", "tests/production/test_kustomize.py::test_every_object_is_strictly_valid_for_130_and_137"),
    "deployments/kubernetes/base/rbac.yaml": ("tests/production/test_kustomize.py::test_every_manifest_file_is_reached_by_the_overlays", "tests/production/test_kustomize.py::test_every_object_is_strictly_valid_for_130_and_137", "tests/production/test_production_kubernetes.py::test_rbac_is_namespaced_and_minimal"),
    "deployments/kubernetes/base/worker.yaml": ("tests/production/test_kustomize.py::test_every_manifest_file_is_reached_by_the_overlays", "tests/production/test_kustomize.py::test_every_object_is_strictly_valid_for_130_and_137", "tests/production/test_production_kubernetes.py::test_worker_runs_the_pool_with_secrets_by_reference"),
    "deployments/kubernetes/base/services/namespace.yaml": ("tests/production/test_kustomize.py::test_every_manifest_file_is_reached_by_the_overlays", "tests/production/test_kustomize.py::test_every_object_is_strictly_valid_for_130_and_137"),
    "deployments/kubernetes/base/services/network-policies.yaml": ("tests/production/test_kustomize.py::test_every_manifest_file_is_reached_by_the_overlays", "tests/production/test_kustomize.py::test_every_object_is_strictly_valid_for_130_and_137"),
    "deployments/kubernetes/base/services/opa.yaml": ("tests/production/test_kustomize.py::test_every_manifest_file_is_reached_by_the_overlays", "tests/production/test_kustomize.py::test_every_object_is_strictly_valid_for_130_and_137"),
    "deployments/kubernetes/base/services/postgres.yaml": ("tests/production/test_kustomize.py::test_every_manifest_file_is_reached_by_the_overlays", "tests/production/test_kustomize.py::test_every_object_is_strictly_valid_for_130_and_137"),
    "deployments/kubernetes/base/services/prefect-server.yaml": ("tests/production/test_kustomize.py::test_every_manifest_file_is_reached_by_the_overlays", "tests/production/test_kustomize.py::test_every_object_is_strictly_valid_for_130_and_137"),
    "deployments/kubernetes/base/services/redis.yaml": ("tests/production/test_kustomize.py::test_every_manifest_file_is_reached_by_the_overlays", "tests/production/test_kustomize.py::test_every_object_is_strictly_valid_for_130_and_137"),
    "deployments/kubernetes/base/services/tiled.yaml": ("tests/production/test_kustomize.py::test_every_manifest_file_is_reached_by_the_overlays", "tests/production/test_kustomize.py::test_every_object_is_strictly_valid_for_130_and_137"),
    "deployments/kubernetes/base/services/token-service.yaml": ("tests/production/test_kustomize.py::test_every_manifest_file_is_reached_by_the_overlays", "tests/production/test_kustomize.py::test_every_object_is_strictly_valid_for_130_and_137"),
    "deployments/kubernetes/beamline/kustomization.yaml": ("tests/production/test_kustomize.py::test_every_manifest_file_is_reached_by_the_overlays", "tests/production/test_kustomize.py::test_every_object_is_strictly_valid_for_130_and_137"),
    "deployments/kubernetes/beamline/blueapi.yaml": ("tests/production/test_kustomize.py::test_every_manifest_file_is_reached_by_the_overlays", "tests/production/test_kustomize.py::test_every_object_is_strictly_valid_for_130_and_137"),
    "deployments/kubernetes/overlays/facility/kustomization.yaml": ("tests/production/test_kustomize.py::test_every_manifest_file_is_reached_by_the_overlays", "tests/production/test_kustomize.py::test_every_object_is_strictly_valid_for_130_and_137"),
    "deployments/kubernetes/overlays/facility/site.env": ("tests/production/test_kustomize.py::test_every_manifest_file_is_reached_by_the_overlays", "tests/production/test_kustomize.py::test_every_object_is_strictly_valid_for_130_and_137"),
    "deployments/kubernetes/overlays/facility/token-service.yaml": ("tests/production/test_kustomize.py::test_every_manifest_file_is_reached_by_the_overlays", "tests/production/test_kustomize.py::test_every_object_is_strictly_valid_for_130_and_137", "tests/production/test_kustomize.py::test_overlay_token_service_config_is_the_shipped_one_with_site_urls"),
    "deployments/kubernetes/overlays/facility/beamlines/b01/kustomization.yaml": ("tests/production/test_kustomize.py::test_every_manifest_file_is_reached_by_the_overlays", "tests/production/test_kustomize.py::test_every_object_is_strictly_valid_for_130_and_137"),
    "deployments/kubernetes/overlays/facility/beamlines/b01/config.yaml": ("tests/production/test_kustomize.py::test_every_manifest_file_is_reached_by_the_overlays", "tests/production/test_kustomize.py::test_every_object_is_strictly_valid_for_130_and_137", "tests/production/test_kustomize.py::test_beamline_config_uses_the_site_values"),
    "deployments/kubernetes/overlays/facility/beamlines/b01/trigger.yaml": ("tests/production/test_kustomize.py::test_every_manifest_file_is_reached_by_the_overlays", "tests/production/test_kustomize.py::test_every_object_is_strictly_valid_for_130_and_137", "tests/production/test_kustomize.py::test_beamline_config_uses_the_site_values"),
    "deployments/kubernetes/overlays/local/kustomization.yaml": ("tests/production/test_kustomize.py::test_every_manifest_file_is_reached_by_the_overlays", "tests/production/test_kustomize.py::test_every_object_is_strictly_valid_for_130_and_137"),
    "deployments/cluster/README.md": (f"{HERE}::test_readmes_name_only_files_that_exist",),
    "deployments/cluster/build.sh": (f"{HERE}::test_shell_scripts_parse", "tests/facility/test_facility_cluster.py::test_node_is_ready_on_the_built_version"),
    "deployments/cluster/up.sh": (f"{HERE}::test_shell_scripts_parse", "tests/facility/test_facility_cluster.py::test_node_is_ready_on_the_built_version"),
    "deployments/cluster/down.sh": (f"{HERE}::test_shell_scripts_parse", "tests/facility/test_facility_teardown.py::test_down_sh_undoes_everything_up_sh_recorded"),
    "deployments/cluster/coredns.yaml": ("tests/facility/test_facility_cluster.py::test_coredns_answers_for_services_from_a_pod",
                                         "tests/facility/test_facility_cluster.py::test_every_service_runs_its_visitflow_image_and_becomes_ready"),
    "deployments/cluster/add-hosts.sh": (f"{HERE}::test_shell_scripts_parse",
                                         "tests/facility/test_facility_cluster.py::test_every_service_runs_its_visitflow_image_and_becomes_ready"),
    "deployments/cluster/load-images.sh": (f"{HERE}::test_shell_scripts_parse",
                                          "tests/facility/test_facility_cluster.py::test_the_local_overlay_is_what_the_cluster_holds"),
    "deployments/cluster/oci_archive.py": ("tests/facility/test_facility_cluster.py::test_the_local_overlay_is_what_the_cluster_holds",),
    "deployments/kubernetes/base-job-template.json": (
        "tests/production/test_production_kubernetes.py::test_shipped_template_is_the_generated_one",
        "tests/production/test_production_postgres.py::test_flow_run_roundtrip_and_job_render_on_postgres"),
    "deployments/kubernetes/secrets.example.yaml": (
        "tests/production/test_production_kubernetes.py::test_example_secrets_hold_placeholders_for_every_reference",),
    "deployments/kubernetes/use-k8s-pool.sh": (
        f"{HERE}::test_shell_scripts_parse",
        "tests/production/test_production_postgres.py::test_use_k8s_pool_script_against_postgres_server"),
    "deployments/opa/authz.rego": ("tests/core/test_authority.py::test_rego_unit_tests_pass",
                                   "tests/production/test_opa_token.py::test_the_configured_token_gets_decisions_with_reasons"),
    "deployments/opa/authz_test.rego": ("tests/core/test_authority.py::test_rego_unit_tests_pass",),
    "deployments/opa/system_authz.rego": (
        "tests/production/test_opa_token.py::test_only_the_admin_token_writes_data_and_health_stays_open",),
    "deployments/opa/tiled_entry.rego": ("tests/tiled/test_tiled_rego_policy.py::test_bob_creates_tagged_runs_only_in_his_visit",),
    "deployments/opa/tiled_visitflow.rego": ("tests/tiled/test_tiled_rego_policy.py::test_bob_creates_tagged_runs_only_in_his_visit", "tests/core/test_authority.py::test_rego_unit_tests_pass"),
    "deployments/opa/facility_tiled.rego": ("tests/tiled/test_tiled_rego_policy.py::test_bob_creates_tagged_runs_only_in_his_visit",),
    "deployments/opa/tiled_visitflow_test.rego": ("tests/core/test_authority.py::test_rego_unit_tests_pass",),
    "deployments/opa/tiled-access-control.yml": ("tests/tiled/test_tiled_rego_policy.py::test_bob_creates_tagged_runs_only_in_his_visit",),
    "deployments/prometheus/rules.yml": ("tests/ops/test_alert_rules.py::test_rules_pass_promtool_check",
                                         "tests/ops/test_alert_rules.py::test_opa_unavailable_fires_on_the_token_services_scraped_failures"),
    "deployments/opa/data.json": ("tests/core/test_authority.py::test_opa_answers_with_reasons",),
    "deployments/opa/install.sh": (f"{HERE}::test_shell_scripts_parse", "tests/core/test_authority.py::test_rego_unit_tests_pass"),
    "deployments/postgres/start-local.sh": (
        f"{HERE}::test_shell_scripts_parse", f"{HERE}::test_local_postgres_scripts_start_and_stop_a_cluster",
        f"{HERE}::test_local_postgres_script_with_a_tls_pair_serves_verify_full_and_refuses_plain_logins"),
    "deployments/postgres/stop-local.sh": (f"{HERE}::test_shell_scripts_parse",
                                           f"{HERE}::test_local_postgres_scripts_start_and_stop_a_cluster"),
}

#: tests named by a path alone stand for the module (its fixtures load the file as shipped).
MODULE_ONLY = re.compile(r"^tests/[\w/]+\.py$")


def shipped_files() -> list[str]:
    """Files under deployments/ and blocks/ (tracked or not; caches and bytecode aside)."""
    out = []
    for top in ("deployments", "blocks"):
        for path in sorted((REPO / top).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                out.append(path.relative_to(REPO).as_posix())
    return out


def test_every_shipped_file_is_covered():
    missing = [f for f in shipped_files() if f not in SHIPPED]
    assert not missing, f"not loaded by any test as shipped (add to SHIPPED in {HERE}): {missing}"
    gone = [f for f in SHIPPED if not (REPO / f).exists()]
    assert not gone, f"SHIPPED lists files that are not there: {gone}"


def _test_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}


def test_each_listed_test_exists_and_names_its_file():
    problems = []
    for shipped, tests in SHIPPED.items():
        for test in tests:
            module, _, name = test.partition("::")
            path = REPO / module
            if not path.exists():
                problems.append(f"{shipped}: {module} does not exist")
                continue
            if name and name not in _test_names(path):
                problems.append(f"{shipped}: no test {name} in {module}")
            if not name and not MODULE_ONLY.match(module):
                problems.append(f"{shipped}: {test} is neither a test id nor a module")
            if module != HERE and not _names(path, shipped):
                problems.append(f"{shipped}: {module} does not name it, nor does a fixture module it uses")
    assert not problems, "\n".join(problems)


def _fixture_modules_naming(shipped: str) -> dict[Path, set[str]]:
    """tests/fixtures modules whose text names ``shipped``, with the fixtures/functions they define."""
    out = {}
    for path in (REPO / "tests" / "fixtures").glob("*.py"):
        if Path(shipped).name in path.read_text():
            out[path] = _test_names(path)
    return out


def _names(test_module: Path, shipped: str) -> bool:
    """The test module names the file, or uses (by name) a fixture/helper of a fixtures module
    that does (e.g. ``opa`` from opa_fixtures.py, which starts OPA on authz.rego and data.json)."""
    text = test_module.read_text()
    if Path(shipped).name in text:
        return True
    words = set(re.findall(r"\b\w+\b", text))
    return any(names & words for names in _fixture_modules_naming(shipped).values())


# ------------------------------------------------------------------ the fast loaders


def _block_module(name: str):
    spec = importlib.util.spec_from_file_location(f"shipped_blocks_{name[:-3]}", REPO / "blocks" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_block_scripts_build_their_documents_from_a_stated_env():
    from visitflow.flow.credentials import RunAccess

    env = {"VISITFLOW_ISSUER": "https://token.visitflow.example", "VISITFLOW_TILED_URI": "https://tiled.example",
           "VISITFLOW_INSTRUMENT": "i22"}
    facility = _block_module("kubernetes.py").definition(env)
    local = _block_module("local.py").definition(issuer="http://127.0.0.1:8180", raw_uri="http://127.0.0.1:8000")
    for block, raw in ((facility, "i22/cm12345/cm12345-1/u1"), (local, "raw/cm12345-1/u1")):
        access = RunAccess("cm12345-1", "u1", "saxs_average", None, None, None, None, block.layout())
        assert access.raw_path == raw and access.processed_run_path == "processed/cm12345-1/u1"
    assert facility.client_secret is None and facility.client_secret_env == "VISITFLOW_CLIENT_SECRET"
    trigger = yaml.safe_load((REPO / "deployments/blueapi/visitflow-trigger.yaml").read_text())
    assert facility.grant_scope == trigger["grant_scope"], "the block and the shipped trigger settings agree"


def test_trigger_settings_load_through_the_hook(tmp_path):
    from visitflow.trigger.blueapi_hook import load_settings

    path = REPO / "deployments/blueapi/visitflow-trigger.yaml"
    env = {"VISITFLOW_TRIGGER_CONFIG": str(path), "VISITFLOW_TRIGGER_CLIENT_SECRET": "s"}
    settings = load_settings(env)
    assert settings.issuer == "https://token.visitflow.example" and settings.client_id == "blueapi"
    assert settings.grant_scope == "run" and settings.post_on == ("success",) and settings.client_secret == "s"
    token_service = yaml.safe_load((REPO / "deployments/token-service.yaml").read_text())
    assert settings.client_id in token_service["clients"], "the exchanging client exists in the token service"
    from visitflow.errors import ConfigError
    with pytest.raises(ConfigError, match="VISITFLOW_TRIGGER_CLIENT_SECRET"):
        load_settings({"VISITFLOW_TRIGGER_CONFIG": str(path)})


def test_token_service_configs_load(monkeypatch):
    from visitflow.errors import ConfigError
    from visitflow.token_service.config import IdPConfig
    from visitflow.token_service.federation import Federation

    for name in ("BLUEAPI", "VISITFLOW", "TILED", "ADMIN"):
        monkeypatch.setenv(f"VISITFLOW_{name}_SECRET", f"s-{name}")
    monkeypatch.setenv("VISITFLOW_OPA_TOKEN", "t")
    monkeypatch.setenv("VISITFLOW_TOKEN_SERVICE_DATABASE_URL", "postgresql://ts:pw@db/tokens")
    config = IdPConfig.load(REPO / "deployments/token-service.yaml")
    assert config.state.kind == "postgres" and config.state.database_url == "postgresql://ts:pw@db/tokens"
    monkeypatch.delenv("VISITFLOW_TOKEN_SERVICE_DATABASE_URL")
    with pytest.raises(ConfigError, match="VISITFLOW_TOKEN_SERVICE_DATABASE_URL"):
        IdPConfig.load(REPO / "deployments/token-service.yaml")
    monkeypatch.setenv("VISITFLOW_TOKEN_SERVICE_DATABASE_URL", "postgresql://ts:pw@db/tokens")
    federation = Federation.from_config(config.federation)
    realm = json.loads((REPO / "deployments/keycloak/realm-facility.json").read_text())["realm"]
    assert federation.trusts(f"http://127.0.0.1:8080/realms/{realm}"), "one realm name: the shipped realm's"
    dev = IdPConfig.load(REPO / "deployments/idp.yaml")
    assert dev.users and not dev.production


def test_the_facility_realm_is_fit_as_shipped():
    from visitflow.production.keycloak_identity import FACILITY_REALM, identity_problems

    realm = json.loads((REPO / "deployments/keycloak/realm-facility.json").read_text())
    assert identity_problems(realm) == [] and realm["realm"] == FACILITY_REALM
    text = "\n".join((REPO / p).read_text() for p in ("README.md", "docs/production.md", "docs/blueapi.md",
                                                        "deployments/token-service.yaml"))
    names = set(re.findall(r"/realms/([a-z-]+)", text))
    assert names <= {FACILITY_REALM, "visitflow", "master"}, names
    assert FACILITY_REALM in names


def test_shell_scripts_parse():
    scripts = [f for f in shipped_files() if f.endswith(".sh")]
    assert scripts
    for script in scripts:
        # from stdin: the fast tier's guard (tests/fixtures/tiers.py) reads start-local.sh in an argv as a server
        done = subprocess.run(["bash", "-n"], input=(REPO / script).read_text(), capture_output=True, text=True)
        assert done.returncode == 0, (script, done.stderr)
        assert (REPO / script).read_text().startswith("#!"), script


def test_python_files_compile():
    for f in shipped_files():
        if f.endswith(".py"):
            compile((REPO / f).read_text(), f, "exec")


def test_logo_is_a_png():
    head = (REPO / "blocks/logo.png").read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", head[16:24])
    assert width > 0 and height > 0


def test_readmes_name_only_files_that_exist():
    for readme in [f for f in shipped_files() if f.endswith("README.md")]:
        text = (REPO / readme).read_text()
        for ref in set(re.findall(r"`((?:deployments|blocks|docs|tests|visitflow)/[\w./-]+)`", text)):
            ref = ref.rstrip(".")
            assert (REPO / ref).exists() or "*" in ref, (readme, ref)


def test_visitflow_up_keeps_off_opas_default_port():
    """OPA serves on 8181 by default; ``visitflow up``'s worker health port was 8181 too."""
    import argparse

    from visitflow.stack.cli import add_port_arguments

    parser = argparse.ArgumentParser()
    add_port_arguments(parser)
    ports = vars(parser.parse_args([]))
    assert 8181 not in ports.values(), ports
    assert "8181" in (REPO / "deployments/token-service.yaml").read_text(), "the shipped OPA URL is OPA's default"


@pytest.mark.e2e
def test_local_postgres_scripts_start_and_stop_a_cluster(tmp_path):
    """deployments/postgres/start-local.sh then stop-local.sh, as .ci/run uses them."""
    from tests.fixtures.ci import missing_part

    if not list(Path("/usr/lib/postgresql").glob("*/bin/initdb")):
        missing_part("PostgreSQL server not installed (.ci/install-postgres)")
    from visitflow.stack.services import free_port

    directory = Path("/tmp") / f"vf-shipped-pg-{os.getpid()}"  # the postgres OS user must reach it
    port = free_port()
    try:
        up = subprocess.run(["bash", str(REPO / "deployments/postgres/start-local.sh"), str(directory), str(port)],
                            capture_output=True, text=True, timeout=300)
        assert up.returncode == 0 and up.stdout.startswith("postgresql://"), up.stderr
        import asyncio

        import asyncpg

        async def one():
            conn = await asyncpg.connect(up.stdout.strip())
            try:
                return await conn.fetchval("select 1")
            finally:
                await conn.close()

        assert asyncio.run(one()) == 1
        down = subprocess.run(["bash", str(REPO / "deployments/postgres/stop-local.sh"), str(directory)],
                              capture_output=True, text=True, timeout=120)
        assert down.returncode == 0, down.stderr
        with pytest.raises(OSError):
            asyncio.run(one())
    finally:
        subprocess.run(["bash", str(REPO / "deployments/postgres/stop-local.sh"), str(directory)],
                       capture_output=True, timeout=120)
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.e2e
def test_local_postgres_script_with_a_tls_pair_serves_verify_full_and_refuses_plain_logins(tmp_path):
    """start-local.sh as shipped with PG_TLS_CERT/PG_TLS_KEY (the facility benchmark's database,
    benchmarks/postgres.py): a client verifying the server against the CA (sslmode=verify-full,
    hostname 127.0.0.1 against the certificate's IP SAN) gets a TLS session; a login without TLS
    (sslmode=disable) is refused by pg_hba, and a client trusting another CA fails the handshake."""
    import asyncio
    import ssl

    import asyncpg

    from tests.fixtures.ci import missing_part
    from tests.fixtures.keycloak_production import ca_and_cert
    from visitflow.stack.services import free_port

    if not list(Path("/usr/lib/postgresql").glob("*/bin/initdb")):
        missing_part("PostgreSQL server not installed (.ci/install-postgres)")
    ca, cert, key = ca_and_cert(tmp_path / "tls")
    other_ca = ca_and_cert(tmp_path / "other")[0]
    directory = Path("/tmp") / f"vf-shipped-pg-tls-{os.getpid()}"  # the postgres OS user must reach it
    env = {**os.environ, "PG_TLS_CERT": str(cert), "PG_TLS_KEY": str(key)}
    for k in ("PGSSLMODE", "PGSSLROOTCERT"):   # the URLs below say what each client does
        env.pop(k, None)
    try:
        up = subprocess.run(["bash", str(REPO / "deployments/postgres/start-local.sh"), str(directory),
                             str(free_port())], capture_output=True, text=True, timeout=300, env=env)
        assert up.returncode == 0 and up.stdout.startswith("postgresql://"), up.stderr
        url = up.stdout.strip()

        async def session(query: str):
            conn = await asyncpg.connect(f"{url}?{query}")
            try:
                return await conn.fetchrow("SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            finally:
                await conn.close()

        row = asyncio.run(session(f"sslmode=verify-full&sslrootcert={ca}"))
        assert row["ssl"] is True and row["version"] in ("TLSv1.2", "TLSv1.3"), dict(row)
        with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError, match="no encryption"):
            asyncio.run(session("sslmode=disable"))
        with pytest.raises(ssl.SSLCertVerificationError):
            asyncio.run(session(f"sslmode=verify-full&sslrootcert={other_ca}"))
    finally:
        subprocess.run(["bash", str(REPO / "deployments/postgres/stop-local.sh"), str(directory)],
                       capture_output=True, timeout=120)
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.e2e
def test_ha_scripts_run_their_module(tmp_path):
    """down.sh runs as shipped on a state that records nothing (a no-op, not down-all: other
    topologies on the machine stay); up.sh's action is one its module accepts.  (The ha suite
    brings the topology up through the same module, visitflow.production.ha_topology.)"""
    done = subprocess.run(["bash", str(REPO / "deployments/ha/down.sh"), str(tmp_path / "no-topology")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    up = (REPO / "deployments/ha/up.sh").read_text()
    action = re.search(r"ha_topology (\w+)", up)[1]
    helped = subprocess.run([sys.executable, "-m", "visitflow.production.ha_topology", "--help"],
                            capture_output=True, text=True, timeout=300)
    assert action == "up" and "up,down,down-all" in helped.stdout, helped.stdout


def test_the_blueapi_image_pins_the_versions_install_blueapi_pins():
    """blueapi's image and .ci/install-blueapi's venv install the same blueapi, h5py and bluesky:
    the image once lacked the bluesky pin, and an image built after bluesky 1.16.0's release died
    at ``blueapi serve`` while the venv (pinned) passed (CI run of 2026-12-08, empty caches)."""
    import re

    script = (REPO / ".ci/install-blueapi").read_text()
    pins = {name: re.search(rf"^{var}=(\S+)$", script, re.M).group(1)
            for name, var in (("blueapi", "BLUEAPI_VERSION"), ("h5py", "H5PY_VERSION"), ("bluesky", "BLUESKY_VERSION"))}
    image = (REPO / "deployments/images/blueapi.Containerfile").read_text()
    runs = [r for r in re.split(r"\n(?=[A-Z]+ )", image) if r.startswith("RUN") and "pip install" in r]
    assert runs, "the Containerfile installs with pip"
    for name, version in pins.items():
        named = re.findall(rf'"{name}==([^"]+)"', image)
        assert named and set(named) == {version}, (name, named, version)
    for run in runs:   # every install that resolves blueapi holds bluesky where the script does
        if '"blueapi==' in run:
            assert f'"bluesky=={pins["bluesky"]}"' in run, run
