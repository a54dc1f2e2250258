# The entry point Tiled's ExternalPolicyDecisionPoint is configured with (endpoints under
# /v1/data/tiled/): the union of the facility's own Tiled rules (data.facility.tiled) and
# visitflow's run-token rules (data.visitflow.tiled).  Each rule set only grants on its own
# tags (`session:...` vs `visitflow:...`), so the union never widens either.
package tiled

import rego.v1

scopes := data.facility.tiled.scopes | data.visitflow.tiled.scopes

tags := sort(array.concat(data.facility.tiled.tags, data.visitflow.tiled.tags))

create if data.facility.tiled.create

create if data.visitflow.tiled.create

modify if data.visitflow.tiled.modify
