# Who may call OPA's own REST API, for `opa run --server --authentication=token
# --authorization=basic` (OPA then evaluates data.system.authz.allow for every request, with
# input.identity = the caller's bearer token).  Without it anyone who reaches OPA's port may
# `PUT /v1/data/facility/...` and grant anyone anything (docs/production.md §9).
#
#   VISITFLOW_OPA_TOKEN=...        the token service's and Tiled's token: ask the visitflow
#                                  policy only (POST/GET /v1/data/visitflow/authz/...)
#   VISITFLOW_OPA_ADMIN_TOKEN=...  the user-office sync: may also write data (optional)
#
# Both are read from OPA's own environment (opa.runtime().env), so no secret is in this file
# or in a bundle; an unset or empty variable matches no token.  /health stays open for probes.
# Tested on a real OPA by tests/production/test_opa_token.py.
package system.authz

import rego.v1

default allow := false

env := opa.runtime().env

token_matches(name) if {
	secret := object.get(env, name, "")
	secret != ""
	input.identity == secret
}

allow if {
	input.path == ["health"]
	input.method == "GET"
}

allow if {
	token_matches("VISITFLOW_OPA_TOKEN")
	input.method in {"GET", "POST"}
	array.slice(input.path, 0, 4) == ["v1", "data", "visitflow", "authz"]
}

allow if token_matches("VISITFLOW_OPA_ADMIN_TOKEN")
