# visitflow's authority at a facility: who may run which analysis on which session, and who
# may read or write which store of a session.  Asked by the token service (before it mints a
# delegation grant or a data token) and by Tiled (for users' own tokens), through
# visitflow.core.authority.OPAAuthority:
#
#   POST /v1/data/visitflow/authz/decision  {"input": {subject, action, store, visit, run, analysis}}
#     -> {"result": {"allow": bool, "reason": str}}
#   ... action "act_for" (input also has `for_user`): may this staff member start a run's
#   analyses for `for_user` on the session (staff recovery, visitflow/token_service/acting.py)?
#   POST /v1/data/visitflow/authz/readable_visits  {"input": {subject}}
#     -> {"result": ["a1", ...]}          (what a user's Tiled listing shows)
#
# `subject` holds the *verified* claims of the caller's token (the token service and Tiled
# validate it against the issuer's JWKS first); the user is its `fedid`, else
# `preferred_username`, else `sub` — as DLS keys its user office data by fedid.
# Membership comes from the data bundle (data.json, built from the user office database):
#   facility.subjects[fedid], facility.sessions[visit] = {proposal, beamline, members,
#   analysts, analyses}, facility.proposals[proposal], facility.beamlines[bl].staff,
#   facility.beamlines[bl].service_accounts.
#
# A beamline's blueapi Tiled service account (Keycloak client credentials; blueapi
# `tiled.authentication: ServiceAccount`) is matched as DLS's tiled.rego does: its token's
# `beamline` claim (hard-coded by its Keycloak client, so no user token carries it) names a
# beamline that lists the account.  It may read and write the raw store of that beamline's
# sessions (TiledWriter creates the runs) and nothing else: no processed data, no analyses,
# no other beamline's sessions.
package visitflow.authz

import rego.v1

user := input.subject.fedid if input.subject.fedid
else := input.subject.preferred_username if input.subject.preferred_username
else := input.subject.sub

session := data.facility.sessions[input.visit]

visit_label := sprintf("%s (proposal %s, beamline %s)", [input.visit, session.proposal, session.beamline])

member if user in session.members

analyst if user in session.analysts

staff if user in data.facility.beamlines[session.beamline].staff

sa_beamline := input.subject.beamline if user in data.facility.beamlines[input.subject.beamline].service_accounts

service_account if sa_beamline

refusals contains sprintf("service account %s may not start analyses", [user]) if {
	service_account
	input.action == "run"
}

refusals contains sprintf("service account %s may not %v processed data: it writes raw runs only", [user, input.action]) if {
	service_account
	input.action in {"read", "write"}
	input.store == "processed"
}

refusals contains sprintf("service account %s writes for beamline %s, not for session %s", [user, sa_beamline, visit_label]) if {
	service_account
	session
	session.beamline != sa_beamline
}

refusals contains "the token carries no subject" if not user

refusals contains sprintf("%s is not known to the user office", [user]) if {
	user
	not service_account
	not data.facility.subjects[user]
}

refusals contains sprintf("%s is disabled in the user office", [user]) if data.facility.subjects[user].disabled

refusals contains sprintf("session %s does not exist", [input.visit]) if not session

refusals contains sprintf("unknown action %v (run, read or write)", [input.action]) if {
	not input.action in {"run", "read", "write", "act_for"}
}

refusals contains sprintf("unknown store %v (raw or processed)", [input.store]) if {
	input.action in {"read", "write"}
	not input.store in {"raw", "processed"}
}

refusals contains sprintf("%s may not start analyses on session %s: not an analyst of the session", [user, visit_label]) if {
	input.action == "run"
	session
	not analyst
	not service_account
}

refusals contains sprintf("analysis %v is not enabled for session %s", [input.analysis, visit_label]) if {
	input.action == "run"
	session
	not input.analysis in session.analyses
}

refusals contains sprintf("%s is neither a member of session %s nor staff of its beamline", [user, visit_label]) if {
	input.action == "read"
	session
	not member
	not staff
	not service_account
}

refusals contains sprintf("%s is not a member of session %s", [user, visit_label]) if {
	input.action == "write"
	session
	not member
	not service_account
}

# Staff recovery: beamline staff act for a member of a session on that beamline (the token
# service then asks again, for the user, about every scope: staff never widen what the user has).
for_user := input.for_user if is_string(input.for_user)

refusals contains "act_for names no user to act for (for_user)" if {
	input.action == "act_for"
	not for_user
}

refusals contains sprintf("%s may not act for %v on session %s: not staff of beamline %s", [user, input.for_user, visit_label, session.beamline]) if {
	input.action == "act_for"
	session
	not staff
}

refusals contains sprintf("%v is not a member of session %s: nobody may act for them there", [input.for_user, visit_label]) if {
	input.action == "act_for"
	session
	for_user
	not for_user in session.members
}

what := sprintf("run %v", [input.analysis]) if input.action == "run"
else := sprintf("act for %v", [input.for_user]) if input.action == "act_for"
else := sprintf("%s %s", [input.action, input.store])

default decision := {"allow": false, "reason": "the policy could not decide (malformed input)"}

decision := {"allow": true, "reason": sprintf("%s may %s on session %s", [user, what, visit_label])} if {
	count(refusals) == 0
}

decision := {"allow": false, "reason": concat("; ", sort(refusals))} if count(refusals) > 0

# Sessions whose data the subject may read (members and beamline staff).
readable_visits := sort([visit |
	some visit, s in data.facility.sessions
	readable(s)
])

readable(s) if user in s.members

readable(s) if user in data.facility.beamlines[s.beamline].staff

readable(s) if s.beamline == sa_beamline
