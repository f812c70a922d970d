#!/usr/bin/env bash
# Builds the test tools from Go modules (no prebuilt downloads) into a cache
# folder outside the repository, and prints the folder holding them
# (kubectl, helm, testcluster, kuberay-operator, kube-score) as the last line of stdout.
#
#   testcluster  kube-apiserver + kube-controller-manager + etcd + kubectl in
#                one binary (hack/testcluster); rebuilt only when its go.mod,
#                go.sum or *.go files (or the Go version / link flags) change
#   helm         helm.sh/helm/v4/cmd/helm@$HELM_VERSION; built once per version
#   kuberay-operator  github.com/ray-project/kuberay/ray-operator@$KUBERAY_VERSION (the
#                real KubeRay controller the cluster tests run); built once per version
#   kube-score   github.com/zegl/kube-score/cmd/kube-score@$KUBE_SCORE_VERSION (scores the
#                chart's rendered manifests, tests/cluster/test_helm_chart.py); built once
#                per version, about 1.5 minutes cold
#   coredns      github.com/coredns/coredns@$COREDNS_VERSION: the node tier's DNS (testcluster
#                node); built once per version
#   pause        hack/testcluster/pause, the node's pod sandbox process (built with testcluster)
#   images/      OCI archives the node tier imports: the pause image and the KubeRay operator's
#                image, each one static binary packed by `testcluster image-from-binary`
#
# Environment:
#   DISTILL_TOOLS_DIR  tools folder (default ${XDG_CACHE_HOME:-$HOME/.cache}/distillation-operator/tools)
#   GOPROXY etc.       the usual Go settings; module downloads go through them
#
# Only Go is needed. A cold build takes several minutes (see hack/testcluster/README.md).
set -euo pipefail

HELM_VERSION=v4.3.1
KUBERAY_VERSION=v1.6.2
KUBE_SCORE_VERSION=v1.20.0
COREDNS_VERSION=v1.15.0
# The sandbox image name containerd is configured with (testcluster node --sandbox-image).
PAUSE_IMAGE=localhost/distill-node/pause:1

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
src="$here/testcluster"
tools="${DISTILL_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/distillation-operator/tools}"
bin="$tools/bin"

log() { echo "build-tools: $*" >&2; }

command -v go >/dev/null 2>&1 || { log "go not found in PATH"; exit 1; }

export GOTOOLCHAIN=local # use the installed Go; never download a toolchain
export GOWORK=off
export CGO_ENABLED=0
unset GOFLAGS

mkdir -p "$bin"

# Serialise concurrent runs (e.g. parallel test workers) on the same folder.
if command -v flock >/dev/null 2>&1; then
	exec 9>"$tools/.lock"
	flock 9
fi

sha256() {
	if command -v sha256sum >/dev/null 2>&1; then sha256sum | cut -d' ' -f1; else shasum -a 256 | cut -d' ' -f1; fi
}

elapsed() { echo "$(($(date +%s) - $1))s"; }

# --- testcluster -------------------------------------------------------------
k8s_version="$(awk '$1 == "k8s.io/kubernetes" && $2 ~ /^v/ { print $2; exit }' "$src/go.mod")"
[[ "$k8s_version" =~ ^v([0-9]+)\.([0-9]+)\. ]] || { log "cannot read the k8s.io/kubernetes version from $src/go.mod"; exit 1; }
k8s_major="${BASH_REMATCH[1]}"
k8s_minor="${BASH_REMATCH[2]}"
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
	ldflags+=" -X $pkg.gitVersion=$k8s_version -X $pkg.gitMajor=$k8s_major -X $pkg.gitMinor=$k8s_minor"
	ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.gitCommit="
done

want_hash="$(
	{
		go version
		go env GOOS GOARCH
		echo "$ldflags"
		cd "$src"
		for f in go.mod go.sum $(ls ./*.go ./pause/*.go | LC_ALL=C sort); do
			echo "== $f"
			cat "$f"
		done
	} | sha256
)"
have_hash="$(cat "$tools/testcluster.hash" 2>/dev/null || true)"
if [[ -x "$tools/testcluster" && -x "$tools/pause" && "$have_hash" == "$want_hash" ]]; then
	log "testcluster up to date ($k8s_version)"
else
	log "building testcluster (Kubernetes $k8s_version) (several minutes when the Go build cache is cold)..."
	t0=$(date +%s)
	tmp="$tools/testcluster.tmp.$$"
	trap 'rm -f "$tmp"' EXIT
	(cd "$src" && go build -mod=readonly -trimpath -ldflags "$ldflags" -o "$tmp" .)
	(cd "$src" && go build -mod=readonly -trimpath -ldflags "-s -w" -o "$tools/pause" ./pause)
	mv -f "$tmp" "$tools/testcluster"
	trap - EXIT
	echo "$want_hash" >"$tools/testcluster.hash"
	log "built testcluster in $(elapsed "$t0")"
fi

# --- go-installed tools, one folder per version ------------------------------------
# go_install_once NAME DIR BINARY LDFLAGS PACKAGE@VERSION: `go install` into DIR unless
# DIR/BINARY is there (a version is immutable, so present means done).
go_install_once() {
	local name=$1 dir=$2 binary=$3 flags=$4 package=$5 t0 tmpdir
	if [[ -x "$dir/$binary" ]]; then
		log "$name present"
		return
	fi
	log "building $name..."
	t0=$(date +%s)
	tmpdir="$dir.tmp.$$"
	rm -rf "$tmpdir"
	trap 'rm -rf "$tmpdir"' EXIT
	mkdir -p "$tmpdir"
	GOBIN="$tmpdir" go install -trimpath -ldflags "$flags" "$package"
	rm -rf "$dir"
	mv "$tmpdir" "$dir"
	trap - EXIT
	log "built $name in $(elapsed "$t0")"
}

hv=helm.sh/helm/v4/internal/version
go_install_once "helm $HELM_VERSION" "$tools/helm-$HELM_VERSION" helm \
	"-s -w -X $hv.version=$HELM_VERSION -X $hv.metadata= -X $hv.gitTreeState=clean" \
	"helm.sh/helm/v4/cmd/helm@$HELM_VERSION"
go_install_once "kuberay-operator $KUBERAY_VERSION" "$tools/kuberay-$KUBERAY_VERSION" ray-operator \
	"-s -w" "github.com/ray-project/kuberay/ray-operator@$KUBERAY_VERSION"
go_install_once "kube-score $KUBE_SCORE_VERSION" "$tools/kube-score-$KUBE_SCORE_VERSION" kube-score \
	"-s -w -X main.version=$KUBE_SCORE_VERSION" "github.com/zegl/kube-score/cmd/kube-score@$KUBE_SCORE_VERSION"

go_install_once "coredns $COREDNS_VERSION" "$tools/coredns-$COREDNS_VERSION" coredns \
	"-s -w" "github.com/coredns/coredns@$COREDNS_VERSION"

# --- images the node tier imports -------------------------------------------------
# image_from_binary ARCHIVE BINARY REF [FLAGS]: pack BINARY unless ARCHIVE is newer than it.
image_from_binary() {
	local archive=$1 binary=$2 ref=$3
	shift 3
	if [[ -f "$archive" && "$archive" -nt "$binary" ]]; then
		return
	fi
	"$tools/testcluster" image-from-binary --binary "$binary" --ref "$ref" --out "$archive" "$@"
	log "packed $ref into $archive"
}
mkdir -p "$tools/images"
image_from_binary "$tools/images/pause.oci.tar" "$tools/pause" "$PAUSE_IMAGE" --path /pause
image_from_binary "$tools/images/kuberay-operator-$KUBERAY_VERSION.oci.tar" \
	"$tools/kuberay-$KUBERAY_VERSION/ray-operator" "localhost/kuberay/operator:$KUBERAY_VERSION" \
	--path /manager --user 65532:65532

# --- bin/ ------------------------------------------------------------------------
# kubectl is the testcluster binary invoked under the name "kubectl".
ln -sfn ../testcluster "$bin/testcluster"
ln -sfn ../testcluster "$bin/kubectl"
ln -sfn "../helm-$HELM_VERSION/helm" "$bin/helm"
ln -sfn "../kuberay-$KUBERAY_VERSION/ray-operator" "$bin/kuberay-operator"
ln -sfn "../kube-score-$KUBE_SCORE_VERSION/kube-score" "$bin/kube-score"
ln -sfn "../coredns-$COREDNS_VERSION/coredns" "$bin/coredns"

echo "$bin"
