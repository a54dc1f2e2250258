"""Real servers for the test session: see idp_fixtures.py and tiled_fixtures.py."""

import os

os.environ.setdefault("PREFECT_HOME", os.path.join(os.environ.get("TMPDIR", "/tmp"), "visitflow-test-prefect-home"))

pytest_plugins = ["tests.idp_fixtures", "tests.keycloak_fixtures", "tests.prefect_fixtures",
                  "tests.blueapi_fixtures", "tests.opa_fixtures", "tests.federation_fixtures", "tests.ha_fixtures"] + (
    ["tests.tiled_fixtures"] if os.path.exists(os.path.join(os.path.dirname(__file__), "tiled_fixtures.py")) else []
)
