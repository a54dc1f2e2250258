"""Real servers for the test session: the fixtures live in tests/fixtures/ (one module per server)."""

import os

os.environ.setdefault("PREFECT_HOME", os.path.join(os.environ.get("TMPDIR", "/tmp"), "visitflow-test-prefect-home"))

pytest_plugins = [
    # first: the fixture modules below import it (.ci/run's background builds: wait, run their users last)
    "tests.fixtures.background_builds",
    "tests.fixtures.idp_fixtures", "tests.fixtures.keycloak_fixtures", "tests.fixtures.prefect_fixtures",
    "tests.fixtures.blueapi_fixtures", "tests.fixtures.opa_fixtures", "tests.fixtures.federation_fixtures",
    "tests.fixtures.ha_fixtures", "tests.fixtures.tiled_fixtures", "tests.fixtures.image_fixtures",
    "tests.fixtures.cluster_fixtures", "tests.fixtures.facility_fixtures",
    "tests.fixtures.tiers",   # marks `slow` from the fixtures a test uses; guards the fast tier
    "tests.fixtures.timing",  # wall time by test file, at the end: the CI budget's map
]
