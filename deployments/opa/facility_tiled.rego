# EMULATED stand-in for a facility's existing Tiled rules (shaped after DiamondLightSource/authz
# policy/diamond/policy/tiled: nodes tagged by session, read-only by default, writes for the
# beamline's service account).  Not the facility's policy: a small placeholder so the combined
# entry point (package `tiled`, below) is exercised with two rule sets side by side.
package facility.tiled

import rego.v1

# Membership a user office sync would provide.
sessions := {
	"12345": {"beamline": "i22", "members": ["carol"]},
}

user := input.principal.id

default scopes := set()

scopes := {"read:metadata", "read:data"} if {
	some tag in input.access_tags
	some s in session_of(tag)
	user in sessions[s].members
}

scopes := {"read:metadata", "read:data", "write:metadata", "write:data", "create:node"} if {
	input.principal.type == "service"
	some tag in input.access_tags
	some s in session_of(tag)
	user == sprintf("%s-writer", [sessions[s].beamline])
}

session_of(tag) := [m[1] | some m in regex.find_all_string_submatch_n(`^session:([0-9]+)$`, tag, 1)]

tags := [sprintf("session:%s", [s]) | some s, info in sessions; user in info.members]

create if {
	input.principal.type == "service"
	count(input.access_tags) > 0
	every tag in input.access_tags {
		some s in session_of(tag)
		user == sprintf("%s-writer", [sessions[s].beamline])
	}
}
