#!/usr/bin/env bash
# Start a single-node Kubernetes from build.sh's binaries; every side effect is written to
# $STATE/record so that down.sh undoes exactly that (processes, bridge, iptables chains, mounts).
#
#   deployments/cluster/up.sh            # prints `export KUBECONFIG=...`; Node Ready when it returns
#
# Why these settings (each was needed on this machine; see deployments/cluster/README.md):
# containerd's CRI `restrict_oom_score_adj` (root here lacks CAP_SYS_RESOURCE), kubelet
# `failCgroupV1: false` (cgroup v1 host), `cgroupDriver: cgroupfs` (no systemd), `failSwapOn: false`,
# `makeIPTablesUtilChains: false`; the pause and CoreDNS images are imported from local archives.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
STATE="${VISITFLOW_CLUSTER_STATE:-/var/lib/visitflow-cluster}"
NODE="${VISITFLOW_CLUSTER_NODE:-visitflow-node}"
POD_CIDR="${VISITFLOW_CLUSTER_POD_CIDR:-10.244.0.0/24}"
SERVICE_CIDR="10.96.0.0/16"; API_SERVICE_IP="10.96.0.1"; DNS_IP="10.96.0.10"
API_PORT="${VISITFLOW_CLUSTER_API_PORT:-16443}"; ETCD_PORT="${VISITFLOW_CLUSTER_ETCD_PORT:-23790}"
BRIDGE="vfk8s0"; CNI_NET="visitflow-pods"
BIN="$(bash "$HERE/build.sh")/bin"; CACHE="$(dirname "$BIN")"
NODE_IP="$(ip -4 route get 1.1.1.1 | sed -n 's/.* src \([0-9.]*\).*/\1/p')"
log() { echo "[cluster/up $(date -u +%T)] $*" >&2; }
if [ -s "$STATE/record" ]; then echo "cluster state exists at $STATE: run down.sh first" >&2; exit 1; fi
mkdir -p "$STATE"/{pki,logs,etcd,cni/net.d,cni/ipam,containerd,kubelet}
REC="$STATE/record"; : > "$REC"
record() { echo "$*" >> "$REC"; }
record state "$STATE"

# --- sysctls (old values recorded, restored by down.sh) ---------------------------------------
for kv in net.ipv4.ip_forward=1 net.bridge.bridge-nf-call-iptables=1; do
  k="${kv%%=*}"; record sysctl "$k" "$(sysctl -n "$k")"; sysctl -qw "$kv"
done

# --- certificates: one CA, a serving cert for the apiserver, a client cert per component ------
P="$STATE/pki"
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=visitflow-cluster-ca" \
  -keyout "$P/ca.key" -out "$P/ca.crt" 2>/dev/null
cert() {  # name subject [SANs]
  openssl req -newkey rsa:2048 -nodes -subj "$2" -keyout "$P/$1.key" -out "$P/$1.csr" 2>/dev/null
  local ext="$P/$1.ext"; echo "basicConstraints=CA:FALSE" > "$ext"
  if [ -n "${3:-}" ]; then echo "subjectAltName=$3" >> "$ext"; echo "extendedKeyUsage=serverAuth,clientAuth" >> "$ext"
  else echo "extendedKeyUsage=clientAuth" >> "$ext"; fi
  openssl x509 -req -in "$P/$1.csr" -CA "$P/ca.crt" -CAkey "$P/ca.key" -CAcreateserial -days 2 \
    -extfile "$ext" -out "$P/$1.crt" 2>/dev/null
}
cert apiserver "/CN=kube-apiserver" "DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,DNS:localhost,IP:127.0.0.1,IP:$NODE_IP,IP:$API_SERVICE_IP"
cert admin "/O=system:masters/CN=visitflow-admin"
cert apiserver-kubelet "/O=system:masters/CN=kube-apiserver-kubelet-client"
cert controller-manager "/CN=system:kube-controller-manager"
cert scheduler "/CN=system:kube-scheduler"
cert kubelet "/O=system:nodes/CN=system:node:$NODE"
cert kube-proxy "/CN=system:kube-proxy"
openssl genrsa -out "$P/sa.key" 2048 2>/dev/null; openssl rsa -in "$P/sa.key" -pubout -out "$P/sa.pub" 2>/dev/null
kubeconfig() {  # name
  cat > "$STATE/$1.kubeconfig" <<KC
apiVersion: v1
kind: Config
clusters: [{name: visitflow, cluster: {server: "https://$NODE_IP:$API_PORT", certificate-authority: "$P/ca.crt"}}]
users: [{name: $1, user: {client-certificate: "$P/$1.crt", client-key: "$P/$1.key"}}]
contexts: [{name: visitflow, context: {cluster: visitflow, user: $1}}]
current-context: visitflow
KC
}
for c in admin controller-manager scheduler kubelet kube-proxy; do kubeconfig "$c"; done
export KUBECONFIG="$STATE/admin.kubeconfig"

start() {  # name command...   (background, logs under $STATE/logs, pid recorded)
  local name="$1"; shift
  setsid "$@" > "$STATE/logs/$name.log" 2>&1 < /dev/null &
  record pid "$!" "$name"
}
wait_for() {  # what seconds command...
  local what="$1" t="$2"; shift 2
  for _ in $(seq "$t"); do "$@" > /dev/null 2>&1 && return 0; sleep 1; done
  log "timed out waiting for $what"; return 1
}

# --- etcd (Debian's etcd-server) ---------------------------------------------------------------
start etcd etcd --name visitflow --data-dir "$STATE/etcd" \
  --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
  --listen-peer-urls "http://127.0.0.1:$((ETCD_PORT + 10))" --initial-advertise-peer-urls "http://127.0.0.1:$((ETCD_PORT + 10))" \
  --initial-cluster "visitflow=http://127.0.0.1:$((ETCD_PORT + 10))"
wait_for etcd 60 curl -sf "http://127.0.0.1:$ETCD_PORT/health"

# --- control plane -------------------------------------------------------------------------------
start kube-apiserver "$BIN/kube-apiserver" --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
  --bind-address 0.0.0.0 --advertise-address "$NODE_IP" --secure-port "$API_PORT" \
  --service-cluster-ip-range "$SERVICE_CIDR" --allow-privileged=true \
  --client-ca-file "$P/ca.crt" --tls-cert-file "$P/apiserver.crt" --tls-private-key-file "$P/apiserver.key" \
  --kubelet-client-certificate "$P/apiserver-kubelet.crt" --kubelet-client-key "$P/apiserver-kubelet.key" \
  --service-account-issuer https://kubernetes.default.svc.cluster.local \
  --service-account-key-file "$P/sa.pub" --service-account-signing-key-file "$P/sa.key" \
  --authorization-mode Node,RBAC --enable-admission-plugins NodeRestriction \
  --kubelet-preferred-address-types InternalIP,Hostname   # the node name is not in any DNS here
wait_for kube-apiserver 180 "$BIN/kubectl" get --raw /readyz
start kube-controller-manager "$BIN/kube-controller-manager" --kubeconfig "$STATE/controller-manager.kubeconfig" \
  --authentication-kubeconfig "$STATE/controller-manager.kubeconfig" --authorization-kubeconfig "$STATE/controller-manager.kubeconfig" \
  --bind-address 127.0.0.1 --leader-elect=false --use-service-account-credentials=true \
  --service-account-private-key-file "$P/sa.key" --root-ca-file "$P/ca.crt" \
  --cluster-signing-cert-file "$P/ca.crt" --cluster-signing-key-file "$P/ca.key" --allocate-node-cidrs=false
start kube-scheduler "$BIN/kube-scheduler" --kubeconfig "$STATE/scheduler.kubeconfig" \
  --authentication-kubeconfig "$STATE/scheduler.kubeconfig" --authorization-kubeconfig "$STATE/scheduler.kubeconfig" \
  --bind-address 127.0.0.1 --leader-elect=false

# --- containerd 1.6 (its own instance, root and socket under $STATE) ------------------------------
CTRD="$STATE/containerd"; SOCK="$CTRD/containerd.sock"
cat > "$CTRD/config.toml" <<TOML
version = 2
root = "$CTRD/root"
state = "$CTRD/state"
[grpc]
  address = "$SOCK"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "registry.k8s.io/pause:3.10"
  restrict_oom_score_adj = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$STATE/cni/net.d"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
      SystemdCgroup = false
TOML
cat > "$STATE/cni/net.d/10-visitflow.conflist" <<CNI
{"cniVersion": "0.4.0", "name": "$CNI_NET", "plugins": [
  {"type": "bridge", "bridge": "$BRIDGE", "isGateway": true, "ipMasq": true, "hairpinMode": true,
   "ipam": {"type": "host-local", "dataDir": "$STATE/cni/ipam", "ranges": [[{"subnet": "$POD_CIDR"}]],
            "routes": [{"dst": "0.0.0.0/0"}]}},
  {"type": "portmap", "capabilities": {"portMappings": true}},
  {"type": "loopback"}]}
CNI
record bridge "$BRIDGE"
record cni-network "$CNI_NET"
start containerd containerd --config "$CTRD/config.toml"
wait_for containerd 60 ctr -a "$SOCK" version
for img in "$CACHE/pause.tar" "$CACHE/coredns.tar"; do
  bash "$HERE/load-images.sh" "$img" 2> /dev/null
done

# --- kubelet ---------------------------------------------------------------------------------------
cat > "$STATE/kubelet/config.yaml" <<KCFG
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: "$P/ca.crt"}
authorization: {mode: Webhook}
cgroupDriver: cgroupfs
failCgroupV1: false
failSwapOn: false
makeIPTablesUtilChains: false
clusterDNS: ["$DNS_IP"]
clusterDomain: cluster.local
containerRuntimeEndpoint: "unix://$SOCK"
resolvConf: /etc/resolv.conf
evictionHard: {memory.available: "100Mi", nodefs.available: "2%", imagefs.available: "2%"}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
healthzBindAddress: 127.0.0.1
KCFG
record iptables kubelet
start kubelet "$BIN/kubelet" --config "$STATE/kubelet/config.yaml" --kubeconfig "$STATE/kubelet.kubeconfig" \
  --root-dir "$STATE/kubelet/root" --hostname-override "$NODE" --node-ip "$NODE_IP" \
  --cert-dir "$STATE/kubelet/pki"

# --- kube-proxy (iptables mode; chains removed by `kube-proxy --cleanup` in down.sh) ----------
cat > "$STATE/kube-proxy.yaml" <<KP
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: "$STATE/kube-proxy.kubeconfig"}
mode: iptables
clusterCIDR: "$POD_CIDR"
hostnameOverride: "$NODE"
conntrack: {maxPerCore: 0}
metricsBindAddress: 127.0.0.1:10249
healthzBindAddress: 127.0.0.1:10256
iptables: {localhostNodePorts: false}
KP
record iptables kube-proxy
start kube-proxy "$BIN/kube-proxy" --config "$STATE/kube-proxy.yaml"

wait_for "Node $NODE Ready" 180 "$BIN/kubectl" wait --for=condition=Ready "node/$NODE" --timeout=1s
# --- cluster DNS: CoreDNS as a Deployment behind Service kube-dns ($DNS_IP) -------------------------
"$BIN/kubectl" apply -f "$HERE/coredns.yaml" > /dev/null
wait_for "CoreDNS" 180 "$BIN/kubectl" -n kube-system rollout status deployment/coredns --timeout=1s
# --- storage: StorageClass visitflow-local + local PVs (directories under $STATE/volumes) -----------
# No dynamic provisioner here; a facility has its own class (overlays/facility), the local overlay
# names this one.  WaitForFirstConsumer: a claim binds when its pod is scheduled, as on a cluster.
{
  echo "apiVersion: storage.k8s.io/v1"; echo "kind: StorageClass"
  echo "metadata: {name: visitflow-local}"; echo "provisioner: kubernetes.io/no-provisioner"
  echo "volumeBindingMode: WaitForFirstConsumer"; echo "reclaimPolicy: Delete"
  for i in $(seq 1 "${VISITFLOW_CLUSTER_VOLUMES:-10}"); do
    d="$STATE/volumes/pv$i"; mkdir -p "$d"; chmod 0777 "$d"
    echo "---"; echo "apiVersion: v1"; echo "kind: PersistentVolume"
    echo "metadata: {name: visitflow-local-pv$i}"
    echo "spec:"
    echo "  capacity: {storage: 200Gi}"
    echo "  accessModes: [ReadWriteOnce]"
    echo "  persistentVolumeReclaimPolicy: Retain"
    echo "  storageClassName: visitflow-local"
    echo "  local: {path: \"$d\"}"
    echo "  nodeAffinity: {required: {nodeSelectorTerms: [{matchExpressions: [{key: kubernetes.io/hostname, operator: In, values: [\"$NODE\"]}]}]}}"
  done
} | "$BIN/kubectl" apply -f - > /dev/null
log "Node $NODE Ready; KUBECONFIG=$KUBECONFIG"
echo "export KUBECONFIG=$KUBECONFIG PATH=$BIN:\$PATH"
