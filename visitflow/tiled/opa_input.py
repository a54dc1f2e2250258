"""The one method Tiled leaves to a deployment of its own OPA access policy.

Tiled 0.2.20's ``ExternalPolicyDecisionPoint`` (tiled.access_control.access_policies) is
abstract in ``build_input`` only: it POSTs whatever that returns to the policy engine's four
endpoints and reads ``{"result": ...}`` back.  :class:`OPAInput` fills it in with what the
Rego rules in deployments/opa/tiled_visitflow.rego decide on — the request's scopes (Tiled's
coarse scopes plus the token's verified visitflow scopes, as visitflow's authenticator
delivers them), the node's (or the requested) access tags, and the principal.  Everything
else (calling OPA, filters, scopes, create/modify) is Tiled's class unchanged; this is not
visitflow's access policy (:mod:`.access_policy`), which decides by path.

Why the token itself is not sent: the authenticator has already verified it, and OPA then
needs no JWKS; the scopes are the verified ones.
"""

from __future__ import annotations

import json
from typing import Optional

from .tiled_compat import ExternalPolicyDecisionPoint

__all__ = ['OPAInput']


class OPAInput(ExternalPolicyDecisionPoint):
    """Tiled's ExternalPolicyDecisionPoint with visitflow's input document."""

    def build_input(self, principal, authn_access_tags, authn_scopes, access_tags=None) -> str:
        who: Optional[dict] = None
        if principal is not None:
            ids = getattr(principal, "identities", None) or []
            kind = getattr(principal, "type", None)
            who = {"id": ids[0].id if ids else str(getattr(principal, "uuid", "")),
                   "type": getattr(kind, "value", kind)}
        return json.dumps({"input": {
            "scopes": sorted(authn_scopes or ()),
            "access_tags": sorted(access_tags or ()),
            "principal": who,
        }})
