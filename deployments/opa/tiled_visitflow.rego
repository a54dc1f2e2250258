# visitflow's run tokens decided by OPA for Tiled's own ExternalPolicyDecisionPoint access policy
# (tiled.access_control.access_policies; visitflow/tiled/opa_input.py sends the input), beside a
# facility's existing Tiled rules (deployments/opa/facility_tiled.rego, an emulated stand-in).
#
# Tiled asks four questions, each a POST of {"input": {scopes, access_tags, principal}}:
#   /v1/data/visitflow/tiled/scopes  -> the Tiled scopes the caller holds on a node with these tags
#   /v1/data/visitflow/tiled/tags    -> the tags whose nodes the caller may see (listings, lookups)
#   /v1/data/visitflow/tiled/create  -> true if the caller may create a node carrying these tags
#   /v1/data/visitflow/tiled/modify  -> true if the caller may change a node's tags
# `scopes` are what visitflow's authenticator put on the request: Tiled's coarse scopes plus the
# token's verified visitflow scopes (`read:raw:a1/<run>`, `write:processed:a1/<run>`,
# `read:data:a1`..., grammar in visitflow/core/scopes.py).  Tiled 0.2.20 treats a create/modify
# answer that is *undefined* as "refused"; a defined `false` would let the create through
# (init_node's first value means "tags modified", not "allowed"), so these rules are only ever
# true or undefined.
#
# The policy sees tags, never paths: every node must carry the tags of its place, applied by the
# writer (TiledWriter's `tiled_access_tags` start-document key; `access_tags=` in tiled's client):
#   visitflow:store            the store roots `raw`, `processed` (admin)
#   visitflow:<store>:<visit>  a visit container (admin)
#   visitflow:<store>:<visit>/<run>  and  visitflow:<store>:<visit>/*   a run and all below it
# (`/*` marks "a run of this visit", so visit-wide readers can be given one tag per visit).
package visitflow.tiled

import rego.v1

read_scopes := {"read:metadata", "read:data"}

write_scopes := {"write:metadata", "write:data", "create:node"}

delete_scopes := {"delete:node", "delete:revision"}

admin_scopes := ((read_scopes | write_scopes) | delete_scopes) | {"register", "metrics"}

name := `[A-Za-z0-9][A-Za-z0-9._\-]*`

admin if "visitflow:admin" in input.scopes

# The caller's visitflow data scopes, parsed: {action, store, visit, run ("" = visit-wide)}.
grants contains g if {
	some s in input.scopes
	some m in regex.find_all_string_submatch_n(sprintf(`^(read|write):(data|raw|processed):(%s)(?:/(%s))?$`, [name, name]), s, 1)
	g := {"action": m[1], "store": m[2], "visit": m[3], "run": m[4]}
}

# A node's place from one of its tags: {kind, store, visit, run}.
place(tag) := {"kind": "store"} if tag == "visitflow:store"

place(tag) := {"kind": "visit", "store": m[1], "visit": m[2]} if {
	some m in regex.find_all_string_submatch_n(sprintf(`^visitflow:(raw|processed):(%s)$`, [name]), tag, 1)
}

place(tag) := {"kind": "run", "store": m[1], "visit": m[2], "run": m[3]} if {
	some m in regex.find_all_string_submatch_n(sprintf(`^visitflow:(raw|processed):(%s)/(%s|\*)$`, [name, name]), tag, 1)
}

touches(g, p) if {
	g.store in {p.store, "data"}
	g.visit == p.visit
}

# A grant covers a run place when it is visit-wide or names that run ("*" is only visit-wide).
covers(g, p) if {
	touches(g, p)
	g.run in {"", p.run}
}

holds(action, p) if {
	some g in grants
	g.action == action
	covers(g, p)
}

may(action, p) if holds(action, p)

may("read", p) if holds("write", p) # a writer must be able to find what it writes

visit_wide(action, p) if {
	some g in grants
	g.action == action
	touches(g, p)
	g.run == ""
}

# ------------------------------------------------------------------------------ scopes
default scopes := set()

scopes := admin_scopes if admin

scopes := s if {
	not admin
	s := {x | some tag in input.access_tags; some x in tag_scopes(tag)} | root_scopes
}

# Nodes without tags: the root, and what Tiled serves from inside a node without a catalog
# entry of its own (a table's columns, `.../internal/motor`).  Readable by any holder of a data
# scope: Tiled reaches them only through tagged ancestors, each filtered by `tags` below.
root_scopes := read_scopes if {
	count(input.access_tags) == 0
	count(grants) > 0
} else := set()

tag_scopes(tag) := {"read:metadata"} if {
	place(tag).kind == "store"
	count(grants) > 0
}

# A visit container: visible to anyone with a scope on it; readable by visit-wide readers;
# creating a run under it needs write:metadata + create:node there (Tiled asks for both), so a
# writer of any run of the visit gets them — see docs/production.md for what that lets through.
tag_scopes(tag) := s if {
	p := place(tag)
	p.kind == "visit"
	s := ({"read:metadata" | some g in grants; touches(g, p)}
		| {x | visit_wide("read", p); some x in read_scopes})
		| {x | some g in grants; g.action == "write"; touches(g, p); some x in {"read:metadata", "write:metadata", "create:node"}}
}

tag_scopes(tag) := s if {
	p := place(tag)
	p.kind == "run"
	s := ({x | may("read", p); some x in read_scopes}
		| {x | may("write", p); some x in write_scopes})
		| {x | may("write", p); p.store == "processed"; some x in delete_scopes}
}

# -------------------------------------------------------------------------------- tags
default tags := []

tags := sort(array.concat(["visitflow:store"], [t | some t in visible])) if count(grants) > 0

# The admin holds no data scopes; a tag list cannot say "everything", so it names every visit the
# user office knows (data.facility.sessions, deployments/opa/data.json).
tags := sort(array.concat(["visitflow:store"], [t | some t in admin_visible])) if {
	admin
	count(grants) == 0
}

admin_visible contains sprintf("visitflow:%s:%s%s", [store, visit, suffix]) if {
	some visit, _ in data.facility.sessions
	some store in ["raw", "processed"]
	some suffix in ["", "/*"]
}

visible contains sprintf("visitflow:%s:%s", [store, g.visit]) if {
	some g in grants
	some store in stores(g.store)
}

visible contains sprintf("visitflow:%s:%s/%s", [store, g.visit, run]) if {
	some g in grants
	some store in stores(g.store)
	run := run_tag(g.run)
}

stores("data") := ["raw", "processed"]

stores(s) := [s] if s != "data"

run_tag("") := "*"

run_tag(r) := r if r != ""

# ------------------------------------------------------------------------ create, modify
create if admin

# Every tag asked for must name a run place the caller may write; untagged nodes are refused
# (they would be invisible to everyone but the admin).
create if {
	not admin
	count(input.access_tags) > 0
	every tag in input.access_tags {
		p := place(tag)
		p.kind == "run"
		may_tag(p)
	}
}

may_tag(p) if {
	p.run != "*"
	may("write", p)
}

may_tag(p) if {
	p.run == "*"
	some g in grants
	g.action == "write"
	touches(g, p)
}

modify if admin
