#!/usr/bin/env bash
# Build every visitflow image on this machine with Podman, from Debian's packages and PyPI,
# with no registry pulls; cache each by a hash of its inputs (a second run is a no-op).
#
#   bash deployments/images/build.sh              # build what is missing, print NAME TAG ARCHIVE
#   bash deployments/images/build.sh --env        # ... then print images.env (VISITFLOW_IMAGE_<NAME>=tag)
#   bash deployments/images/build.sh --archives   # ... then print only the archive paths
#   bash deployments/images/build.sh flows idp    # only these (and what they are FROM)
#
# Images (deployments/images/README.md): base (mmdebstrap minbase + python3, imported), runtime
# (base + the visitflow venv; the parent of flows, idp and tiled), flows, idp, tiled, blueapi, opa;
# postgres and redis, each FROM its own mmdebstrap root (pgbase, redisbase) of Debian's package.
# Tags: localhost/visitflow-<name>:<first 16 hex of the input hash>.  Each image is also saved
# with `podman save --format docker-archive` (what `ctr -n k8s.io images import` reads, tag kept)
# to $CACHE/archives/visitflow-<name>-<hash>.tar.  $CACHE/images.env lists the tags.
#
# The inputs of an image: its Containerfile, the files copied into its build context (from this
# checkout's working tree), its parent's tag, and for base the mmdebstrap command.  pip inside a
# build reaches the index through the host pip's CA bundle (copied into the build stage only,
# named by PIP_CERT) with --network host.  No pip download cache: this network's index answers
# are not cacheable (a mounted PIP_CACHE_DIR stayed empty); Podman's layer cache keeps the
# dependency layers instead (each Containerfile installs dependencies before visitflow's code).
set -euo pipefail
shopt -s inherit_errexit   # a failed build inside $(...) stops the script
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
CACHE="${VISITFLOW_CACHE:-/opt/visitflow-cache}/images"
SUITE=bookworm
DPKG_OPTS=(
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*'
    --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/info/*')
# The roots made by mmdebstrap (`podman import`ed; parents only), and the Debian packages in each:
# PostgreSQL and Redis get their own roots, so neither carries python3 nor the venv.
declare -A ROOT_PACKAGES=(
    [base]=python3,python3-venv,ca-certificates
    [pgbase]=postgresql-15
    [redisbase]=redis-server
)
ALL=(base pgbase redisbase runtime flows idp tiled blueapi opa postgres redis)

mode=list; wanted=()
for arg in "$@"; do
    case "$arg" in
        --env) mode=env ;;
        --archives) mode=archives ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        -*) echo "build.sh: unknown flag $arg" >&2; exit 2 ;;
        *) wanted+=("$arg") ;;
    esac
done
[ "${#wanted[@]}" -gt 0 ] || wanted=("${ALL[@]}")
mkdir -p "$CACHE/archives" "$CACHE/context" "$CACHE/logs"
log() { echo "build.sh: $*" >&2; }
# One build at a time per cache: stage() rm -rf's $CACHE/context/<name> and images.env is rewritten,
# so two concurrent runs (.ci/run's background pre-build and the images fixture, or two engineers)
# would pull each other's build context away.  The second waits, then finds the tags and no-ops.
exec 9>"$CACHE/.build.lock"
flock -n 9 || { log "another build.sh holds $CACHE/.build.lock: waiting"; flock 9; }
# ... and no child keeps the lock: a podman helper outliving this script would hold fd 9 open.
podman() { command podman "$@" 9>&-; }
mmdebstrap() { command mmdebstrap "$@" 9>&-; }

is_root() { [ -n "${ROOT_PACKAGES[$1]:-}" ]; }
runnable() { ! is_root "$1" && [ "$1" != runtime ]; }  # roots and runtime: parents only, no archive
parent_of() {  # roots have none
    is_root "$1" && return 0
    case "$1" in runtime|blueapi|opa) echo base ;; postgres) echo pgbase ;; redis) echo redisbase ;; *) echo runtime ;; esac
}

# Files (relative to the checkout) copied into an image's build context under src/.
sources_of() {
    case "$1" in
        runtime) echo constraints.txt pyproject.toml README.md visitflow ;;
        flows) echo prefect.yaml flows ;;
        blueapi) echo visitflow/__init__.py visitflow/errors.py visitflow/core visitflow/trigger \
                      visitflow-trigger deployments/blueapi/visitflow_example_plans.py ;;
    esac
}

# The host pip's CA bundle (PIP_CERT, else pip's configured cert, else Debian's bundle).
pip_ca() {
    local ca="${PIP_CERT:-}"
    [ -n "$ca" ] || ca=$(python3 -m pip config get global.cert 2>/dev/null || true)
    [ -n "$ca" ] || ca=/etc/ssl/certs/ca-certificates.crt
    echo "$ca"
}

# Stage the build context of $1 in $CACHE/context/$1 and print the hash of the image's inputs.
stage() {
    local name=$1 ctx="$CACHE/context/$1" parent_tag=$2 src
    rm -rf "$ctx"; mkdir -p "$ctx/src"
    for src in $(sources_of "$name"); do
        # tracked files plus new, not ignored ones: what `git add` would take, never .venv/caches
        (cd "$REPO" && git ls-files -z --cached --others --exclude-standard -- "$src") \
            | (cd "$REPO" && xargs -0 -r sh -c 'for f; do [ -f "$f" ] && printf "%s\0" "$f"; done' _) \
            | (cd "$REPO" && tar --null -T - -cf -) | tar -xf - -C "$ctx/src"
    done
    if [ "$name" = runtime ]; then  # pyproject's [project.dependencies]: the dependency layer
        python3 -c 'import sys, tomllib; print("\n".join(tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]))' \
            "$REPO/pyproject.toml" > "$ctx/src/requirements.txt"
    fi
    [ "$name" = opa ] && cp "$(bash "$REPO/deployments/opa/install.sh")" "$ctx/opa"
    case "$name" in idp|tiled|blueapi|opa) cp "$HERE/probe" "$ctx/probe" ;; esac  # the HEALTHCHECK
    [ "$name" = postgres ] && cp "$HERE/postgres-entrypoint" "$ctx/postgres-entrypoint"
    cp "$HERE/$name.Containerfile" "$ctx/Containerfile"
    {
        echo "parent $parent_tag"
        (cd "$ctx" && find . -type f ! -name pip-ca.crt -print0 | LC_ALL=C sort -z | xargs -0 -r sha256sum)
    } | sha256sum | cut -c1-16
    # after hashing: the CA bundle is not an input of the image (it never reaches a final layer)
    cp "$(pip_ca)" "$ctx/pip-ca.crt"
}

archive_of() { echo "$CACHE/archives/visitflow-$1-${2##*:}.tar"; }

save() {  # docker-archive keeps the tag, so `ctr images import` names the image by it
    local tag=$1 archive=$2
    [ -s "$archive" ] && return 0
    podman save --quiet --format docker-archive -o "$archive.part" "$tag" >/dev/null
    mv -f "$archive.part" "$archive"
}

# The non-root user every image runs as (uid/gid 10001, numeric so runAsNonRoot can check it)
# is made here, in every root; apt's lists and caches are dropped (no apt-get in any later step).
ROOT_HOOKS=(
    --customize-hook='chroot "$1" useradd --system --uid 10001 --user-group --home-dir /home/visitflow --create-home --shell /usr/sbin/nologin visitflow 2>/dev/null'
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*'
)
# PostgreSQL's package makes a default cluster (/var/lib/postgresql/15/main, /etc/postgresql/15):
# the image's entrypoint makes its own in $PGDATA, so that one goes.
PGBASE_HOOKS=(--customize-hook='rm -rf "$1"/var/lib/postgresql/15 "$1"/etc/postgresql/15')

build_root() {  # name -> tag: an mmdebstrap root with ROOT_PACKAGES[name], imported
    local name=$1 hash tag rootfs args hooks
    args=(--variant=minbase "--include=${ROOT_PACKAGES[$name]}" "${DPKG_OPTS[@]}")
    hooks=("${ROOT_HOOKS[@]}"); [ "$name" = pgbase ] && hooks+=("${PGBASE_HOOKS[@]}")
    hash=$(printf '%s\n' "$SUITE" "${args[@]}" "${hooks[@]}" | sha256sum | cut -c1-16)
    tag="localhost/visitflow-$name:$hash"
    if ! podman image exists "$tag"; then
        log "$name: mmdebstrap $SUITE (${ROOT_PACKAGES[$name]}) -> $tag"
        rootfs=$(mktemp -d "$CACHE/.rootfs.XXXXXX")
        mmdebstrap --quiet "${args[@]}" "${hooks[@]}" "$SUITE" "$rootfs/rootfs.tar"
        podman import --quiet --change 'CMD ["/bin/bash"]' --change 'USER 10001:10001' \
            "$rootfs/rootfs.tar" "$tag" >/dev/null
        rm -rf "$rootfs"
    fi
    echo "$tag"
}

build_image() {  # name parent_tag -> tag
    local name=$1 parent=$2 hash tag ctx="$CACHE/context/$1"
    hash=$(stage "$name" "$parent")
    tag="localhost/visitflow-$name:$hash"
    if ! podman image exists "$tag"; then
        log "$name: building $tag"
        # --format docker: OCI image config has no HEALTHCHECK; docker's keeps it.
        podman build --network host --format docker --pull=never \
            --build-arg "BASE=${TAGS[base]:-}" --build-arg "RUNTIME=${TAGS[runtime]:-}" \
            --build-arg "PARENT=$parent" \
            --label "org.opencontainers.image.source=visitflow" --label "visitflow.inputs=$hash" \
            -t "$tag" -f "$ctx/Containerfile" "$ctx" >"$CACHE/logs/$name.log" 2>&1 \
            || { tail -40 "$CACHE/logs/$name.log" >&2; log "$name: build failed (log: $CACHE/logs/$name.log)"; return 1; }
    fi
    echo "$tag"
}

declare -A TAGS
declare -A NEED
add_need() { local p; NEED[$1]=1; p=$(parent_of "$1"); [ -z "$p" ] || add_need "$p"; }
for name in "${wanted[@]}"; do
    case " ${ALL[*]} " in *" $name "*) add_need "$name" ;; *) echo "build.sh: no image $name" >&2; exit 2 ;; esac
done
for name in "${ALL[@]}"; do
    [ -n "${NEED[$name]:-}" ] || continue
    if is_root "$name"; then TAGS[$name]=$(build_root "$name")
    else TAGS[$name]=$(build_image "$name" "${TAGS[$(parent_of "$name")]}"); fi
    runnable "$name" && save "${TAGS[$name]}" "$(archive_of "$name" "${TAGS[$name]}")"
done

# images.env: what manifests and tests read (sourced by shell, parsed by tests/images/).
env_file="$CACHE/images.env"
{
    echo "# written by deployments/images/build.sh; VISITFLOW_IMAGE_<NAME>=tag, VISITFLOW_ARCHIVE_<NAME>=path"
    for name in "${ALL[@]}"; do
        [ -n "${TAGS[$name]:-}" ] || continue
        upper=${name^^}
        echo "VISITFLOW_IMAGE_$upper=${TAGS[$name]}"
        runnable "$name" && echo "VISITFLOW_ARCHIVE_$upper=$(archive_of "$name" "${TAGS[$name]}")"
    done
} > "$env_file.part"
# keep entries of images not built this time (a partial run must not forget the others)
if [ -f "$env_file" ]; then
    grep -E '^VISITFLOW_(IMAGE|ARCHIVE)_' "$env_file" | while IFS= read -r line; do
        grep -q "^${line%%=*}=" "$env_file.part" || echo "$line"
    done >> "$env_file.part"
fi
mv -f "$env_file.part" "$env_file"

# Forget the previous builds of each image built now: its other archives and Podman tags.  Every
# source change makes a new 1.6 GB runtime-based image, so an unpruned cache grew ~5 GB a commit
# until the node's kubelet evicted the facility suite's Pods for disk pressure (2026-12-07).
# Children before parents (ALL lists parents first), so no old parent is held by an old child.
# Untagged images are left alone: the multi-stage builds' dependency layers are among them.
for (( i = ${#ALL[@]} - 1; i >= 0; i-- )); do
    name=${ALL[$i]}
    [ -n "${TAGS[$name]:-}" ] || continue
    for old in "$CACHE/archives/visitflow-$name-"*.tar; do
        [ -e "$old" ] && [ "$old" != "$(archive_of "$name" "${TAGS[$name]}")" ] && rm -f "$old"
    done
    podman images --format '{{.Repository}}:{{.Tag}}' "localhost/visitflow-$name" 2>/dev/null \
        | grep -vxF "${TAGS[$name]}" | xargs -r podman rmi --ignore > /dev/null 2>&1 || true
done

for name in "${ALL[@]}"; do
    [ -n "${TAGS[$name]:-}" ] || continue
    case "$mode" in
        list) if runnable "$name"; then echo "$name ${TAGS[$name]} $(archive_of "$name" "${TAGS[$name]}")"
              else echo "$name ${TAGS[$name]} -"; fi ;;
        archives) runnable "$name" && archive_of "$name" "${TAGS[$name]}" ;;
    esac
done
[ "$mode" = env ] && cat "$env_file"
exit 0
