"""Production shape: the Kubernetes work pool, the Keycloak realm, PostgreSQL, Prefect HA.

The files that operators deploy live in ``deployments/`` (kubernetes/, keycloak/, postgres/);
this package holds the code that builds or checks them, so tests can prove the files say
what ``docs/production.md`` claims:

- :mod:`visitflow.production.kubernetes` builds the work pool's base job template from
  prefect-kubernetes' own default, and checks a rendered Job for secret hygiene.
- :mod:`visitflow.production.keycloak` compares the Keycloak realm export with the dev
  IdP's YAML (same clients, audiences, scopes, lifetimes).
- :mod:`visitflow.production.ha_topology` runs Prefect's highly available topology on this
  machine (netns hosts, two API servers behind nginx, Redis, PostgreSQL); deployments/ha/.
- :mod:`visitflow.production.ha_recovery` is the heartbeat automation that reschedules a run
  whose worker host died.
- :mod:`visitflow.production.prefect_yaml` retargets ``prefect.yaml``'s deployments at the
  Kubernetes pool without editing the file.

- :mod:`visitflow.production.grant_hygiene` deletes (and revokes) grants whose runs ended.
- :mod:`visitflow.production.provision` makes Tiled, Prefect and OPA's bundle match the
  facility's session list (``visitflow provision``; ``visitflow up`` makes its limits with it).

Nothing here is imported by the running system (trigger, flows, servers); the HA modules
are run by operators, tests and benchmarks.  Internal: no stability promise.
"""

__all__ = []
