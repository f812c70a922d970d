#!/usr/bin/env bash
# Builds the container images (images/*/Dockerfile) and writes them as OCI archives:
#
#   dist/images/distillation-operator-VERSION.oci.tar   kopf + the Kubernetes client, no torch
#   dist/images/distillation-runtime-VERSION.oci.tar    torch (CUDA), transformers, Ray, the stages
#   dist/images/distillation-runtime-vllm-VERSION.oci.tar   the runtime with vLLM (generate on GPUs)
#   dist/images/distillation-quantize-VERSION.oci.tar   the runtime with llm-compressor's pins
#   dist/images/distillation-runtime-VERSION-cpu.oci.tar   only when asked (IMAGES=runtime-cpu)
#
# tagged with the repositories the chart's values.yaml names and the version in pyproject.toml.
#
#   hack/build-images.sh [build] [IMAGE...]  build (default: operator runtime runtime-vllm quantize)
#   hack/build-images.sh podman ARGS...      podman on the project's image storage (tests use it)
#   hack/build-images.sh buildah ARGS...     buildah on the same storage
#
# Where a Docker engine answers (`docker info`), it runs `docker build` from the Dockerfiles'
# public bases and `docker save`. Otherwise it builds daemonless, as root, with no registry:
#   1. debootstrap a Debian minbase root file system (python3, python3-venv, ca-certificates)
#      from the Debian mirror the machine's apt sources name, and import it as a local base image
#      (images/base/Dockerfile: FROM scratch + ADD rootfs.tar.gz); cached, keyed by its recipe;
#   2. `buildah build --isolation chroot` each Dockerfile with BASE set to that image, the host's
#      uv cache bind-mounted in (no second download) and the host's pip CA bundle, if any,
#      mounted read-only and named by the PIP_CERT build argument (never copied into an image);
#   3. `buildah push` to an OCI archive. Archives are cached by a hash of every input (Dockerfile,
#      uv.lock, sources, base, build arguments): an unchanged image is not built again.
# Missing tools (debootstrap buildah podman skopeo runc) are installed with apt-get.
#
# Environment:
#   IMAGES                   images to build when none are named
#   DISTILL_IMAGE_BUILDER    docker | buildah (default: docker if `docker info` answers)
#   DISTILL_STORAGE_DRIVER   overlay | vfs (default: overlay where the kernel mounts it)
#   DISTILL_DEBIAN_MIRROR    mirror for debootstrap (default: read from the apt sources)
#   DISTILL_IMAGES_DIR       output folder (default: dist/images)
#   DISTILL_CACHE_DIR        cache (default: ${XDG_CACHE_HOME:-$HOME/.cache}/distillation-operator)
#   UV_VERSION               uv used inside the builds (the Makefile passes its own)
#   PIP_CERT                 CA bundle for pip/uv in the builds (default: pip's configured cert)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
cache="${DISTILL_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/distillation-operator}"
out="${DISTILL_IMAGES_DIR:-$repo/dist/images}"
uv_version="${UV_VERSION:-0.13.9}"
suite=bookworm
base_packages=python3,python3-venv,ca-certificates
# Bump when the base recipe below changes in a way its inputs do not show.
base_recipe=1

log() { echo "build-images: $*" >&2; }
die() { log "error: $*"; exit 1; }

# ---------------------------------------------------------------------------------------------
# What to build, named as the chart names it
# ---------------------------------------------------------------------------------------------

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$repo/pyproject.toml" | head -n1)
[ -n "$version" ] || die "no version = \"...\" line in pyproject.toml"
chart="$repo/charts/distillation-operator"
app_version=$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' "$chart/Chart.yaml")
[ "$app_version" = "$version" ] ||
  die "Chart.yaml appVersion is '$app_version' but pyproject.toml's version is '$version': make them equal"
operator_repo=$(sed -n '/^image:/,/^[^ #]/ s/^  repository: *//p' "$chart/values.yaml")
runtime_ref=$(sed -n '/^images:/,/^[^ #]/ s/^  runtime: *//p' "$chart/values.yaml")
runtime_vllm_ref=$(sed -n '/^images:/,/^[^ #]/ s/^  runtimeVllm: *//p' "$chart/values.yaml")
quantize_ref=$(sed -n '/^images:/,/^[^ #]/ s/^  quantize: *//p' "$chart/values.yaml")
for ref in "$runtime_ref" "$runtime_vllm_ref" "$quantize_ref"; do
  [ "${ref##*:}" = "$version" ] ||
    die "values.yaml names stage image '$ref', whose tag is not the version $version: update values.yaml"
done
[ -n "$operator_repo" ] || die "values.yaml has no image.repository"

# name -> dockerfile, repository, tag, flavor, IMAGE build argument (- for none)
image_spec() {
  case "$1" in
    operator) echo "operator $operator_repo $version - -" ;;
    runtime) echo "runtime ${runtime_ref%:*} $version cuda runtime" ;;
    runtime-cpu) echo "runtime ${runtime_ref%:*} $version-cpu cpu runtime" ;;
    runtime-vllm) echo "runtime ${runtime_vllm_ref%:*} $version cuda runtime-vllm" ;;
    quantize) echo "runtime ${quantize_ref%:*} $version cuda quantize" ;;
    *) die "unknown image '$1': operator, runtime, runtime-cpu, runtime-vllm or quantize" ;;
  esac
}

# ---------------------------------------------------------------------------------------------
# Tools and the project's own image storage (separate from any other on the machine)
# ---------------------------------------------------------------------------------------------

ensure_tools() {
  local missing=() cmd
  for cmd in "$@"; do command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  command -v apt-get >/dev/null 2>&1 ||
    die "missing ${missing[*]} and no apt-get: install them with your package manager"
  [ "$(id -u)" -eq 0 ] || die "missing ${missing[*]}: run as root, or: sudo apt-get install ${missing[*]}"
  log "installing ${missing[*]} with apt-get"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

storage_driver() {
  if [ -n "${DISTILL_STORAGE_DRIVER:-}" ]; then echo "$DISTILL_STORAGE_DRIVER"; return; fi
  local probe
  probe=$(mktemp -d)
  mkdir -p "$probe"/{l,u,w,m}
  if mount -t overlay overlay -o "lowerdir=$probe/l,upperdir=$probe/u,workdir=$probe/w" \
    "$probe/m" 2>/dev/null; then
    umount "$probe/m"
    echo overlay
  else
    echo vfs
  fi
  rm -rf "$probe"
}

driver=$(storage_driver)
case "$driver" in overlay | vfs) ;; *) die "DISTILL_STORAGE_DRIVER=$driver: use overlay or vfs" ;; esac
store_root="$cache/containers/$driver"
run_root="/run/distillation-operator-containers/$driver"
storage_flags=(--root "$store_root/storage" --runroot "$run_root" --storage-driver "$driver")
# crun fails on this kind of machine's cgroup setup; runc with cgroupfs works.
podman_flags=("${storage_flags[@]}" --tmpdir "$run_root/libpod" --runtime runc
  --cgroup-manager cgroupfs --events-backend file)
storage_ref="containers-storage:[$driver@$store_root/storage+$run_root]"

buildah_() { TMPDIR="$store_root/tmp" buildah "${storage_flags[@]}" "$@"; }

# podman's containers.conf for this storage: runc refuses the default open-files and process
# limits on this kind of machine (setrlimit: operation not permitted), so containers get these.
prepare_storage() {
  mkdir -p "$store_root/storage" "$store_root/tmp" "$run_root/libpod"
  cat >"$store_root/containers.conf.tmp" <<CONF
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]
CONF
  mv "$store_root/containers.conf.tmp" "$store_root/containers.conf"
}

# ---------------------------------------------------------------------------------------------
# The local base: Debian minbase from the machine's own Debian mirror
# ---------------------------------------------------------------------------------------------

debian_mirror() {
  if [ -n "${DISTILL_DEBIAN_MIRROR:-}" ]; then echo "$DISTILL_DEBIAN_MIRROR"; return; fi
  local mirror=""
  # deb822 sources: the URIs of a stanza whose Suites name the suite.
  shopt -s nullglob
  local f
  for f in /etc/apt/sources.list.d/*.sources; do
    mirror=$(awk -v suite="$suite" '
      BEGIN { RS = ""; FS = "\n" }
      {
        uris = ""; ok = 0; deb = 0
        for (i = 1; i <= NF; i++) {
          if ($i ~ /^URIs:/) { uris = $i; sub(/^URIs:[ \t]*/, "", uris); split(uris, u, /[ \t]+/); uris = u[1] }
          if ($i ~ /^Types:/ && $i ~ /(^|[ \t])deb([ \t]|$)/) deb = 1
          if ($i ~ /^Suites:/) { n = split($i, s, /[ \t]+/); for (j = 2; j <= n; j++) if (s[j] == suite) ok = 1 }
        }
        if (ok && deb && uris != "") { print uris; exit }
      }' "$f")
    [ -n "$mirror" ] && break
  done
  shopt -u nullglob
  if [ -z "$mirror" ] && [ -f /etc/apt/sources.list ]; then
    mirror=$(awk -v suite="$suite" '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i !~ /^\[/) { if ($(i + 1) == suite) { print $i; exit } break } }' /etc/apt/sources.list)
  fi
  [ -n "$mirror" ] ||
    die "no Debian mirror for '$suite' in /etc/apt/sources.list{,.d/*.sources}: set DISTILL_DEBIAN_MIRROR"
  echo "$mirror"
}

base_image() {
  local arch key dir ref
  arch=$(dpkg --print-architecture 2>/dev/null || uname -m)
  key=$(printf '%s\n' "recipe=$base_recipe" "suite=$suite" "variant=minbase" \
    "packages=$base_packages" "arch=$arch" "debootstrap=$(debootstrap --version 2>/dev/null)" \
    "$(cat "$repo/images/base/Dockerfile")" | sha256sum | cut -c1-16)
  ref="localhost/distillation-base:$key"
  if buildah_ inspect --type image "$ref" >/dev/null 2>&1; then echo "$ref"; return; fi
  dir="$cache/images/base-$key"
  if [ ! -f "$dir/rootfs.tar.gz" ]; then
    local mirror rootfs started
    mirror=$(debian_mirror)
    rootfs="$cache/images/base-$key.tmp"
    rm -rf "$rootfs" && mkdir -p "$rootfs"
    log "debootstrap --variant=minbase $suite ($base_packages) from the apt sources' mirror"
    started=$SECONDS
    debootstrap --variant=minbase --include="$base_packages" "$suite" "$rootfs/root" "$mirror" \
      >"$rootfs/debootstrap.log" 2>&1 || {
      tail -n 30 "$rootfs/debootstrap.log" >&2
      die "debootstrap failed (log: $rootfs/debootstrap.log)"
    }
    # Nothing of this machine's in the image; no caches, manuals or translations.
    (
      cd "$rootfs/root"
      rm -rf var/lib/apt/lists/* var/cache/apt/* var/cache/debconf/*-old var/log/* \
        usr/share/man/* usr/share/info/* usr/share/locale/* etc/resolv.conf etc/hostname
      find usr/share/doc -type f ! -name copyright -delete
      find usr/share/doc -type d -empty -delete
      : >etc/resolv.conf
    )
    tar --numeric-owner --xattrs --sort=name -C "$rootfs/root" -cf - . | gzip -n >"$rootfs/rootfs.tar.gz"
    mkdir -p "$dir"
    mv "$rootfs/rootfs.tar.gz" "$dir/rootfs.tar.gz"
    rm -rf "$rootfs"
    log "base root file system: $(du -h "$dir/rootfs.tar.gz" | cut -f1) in $((SECONDS - started)) s"
  fi
  cp "$repo/images/base/Dockerfile" "$dir/Dockerfile"
  buildah_ build --isolation chroot --quiet -f "$dir/Dockerfile" -t "$ref" "$dir" >/dev/null
  echo "$ref"
}

# ---------------------------------------------------------------------------------------------
# The images
# ---------------------------------------------------------------------------------------------

# A hash of everything that goes into an image.
inputs_key() {
  local dockerfile=$1
  shift
  (
    cd "$repo"
    printf '%s\n' "$@"
    git ls-files -z --cached --others --exclude-standard -- runtime operator |
      sort -z | xargs -0 sha256sum
    sha256sum "$dockerfile" images/install-venv.sh .dockerignore pyproject.toml uv.lock README.md
  ) | sha256sum | cut -c1-16
}

host_pip_cert() {
  local cert="${PIP_CERT:-}"
  if [ -z "$cert" ] && command -v python3 >/dev/null 2>&1; then
    cert=$(python3 -m pip config get global.cert 2>/dev/null || true)
  fi
  if [ -n "$cert" ] && [ -r "$cert" ]; then echo "$cert"; fi
}

host_uv_cache() {
  local dir="${UV_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/uv}"
  mkdir -p "$dir"
  echo "$dir"
}

summary=()

# Drop the archives of earlier builds of this image and the images no tag names any more (each
# is gigabytes); the layer cache of the current Dockerfiles stays.
forget_older() {
  local ref_repo=$1 tag=$2 key=$3 old
  for old in "$cache/images/archives/${ref_repo##*/}-$tag-"*.oci.tar; do
    [ -e "$old" ] || continue
    [ "$old" = "$cache/images/archives/${ref_repo##*/}-$tag-$key.oci.tar" ] || rm -f "$old"
  done
  buildah_ images --quiet --filter dangling=true --filter "label=dev.distillation.inputs" |
    while read -r id; do buildah_ rmi "$id" >/dev/null 2>&1 || true; done
}

# A push killed half-way (a full disk, a stopped session) leaves an image-sized temporary file
# and a partial archive; the caller holds the build lock, so nothing else is using them. The
# layer cache folder stays.
forget_interrupted_pushes() {
  find "$store_root/tmp" -mindepth 1 -maxdepth 1 ! -name buildah-cache -exec rm -rf {} +
  rm -f "$cache/images/archives/"*.oci.tar.tmp
}

build_daemonless() {
  local name=$1 dockerfile ref_repo tag flavor variant
  read -r dockerfile ref_repo tag flavor variant <<<"$(image_spec "$name")"
  local file="images/$dockerfile/Dockerfile" ref="$ref_repo:$tag"
  local archive_name="${ref_repo##*/}-$tag.oci.tar"
  local key
  key=$(inputs_key "$file" "base=$base_id" "flavor=$flavor" "image=$variant" "version=$version" "uv=$uv_version")
  local cached="$cache/images/archives/${ref_repo##*/}-$tag-$key.oci.tar"
  local started=$SECONDS
  mkdir -p "$cache/images/archives" "$out"
  local have
  have=$(buildah_ inspect --type image --format '{{index .OCIv1.Config.Labels "dev.distillation.inputs"}}' "$ref" 2>/dev/null || true)
  if [ -f "$cached" ] && [ "$have" = "$key" ]; then
    log "$ref: unchanged (inputs $key), reusing $cached"
  elif [ -f "$cached" ]; then
    log "$ref: loading the cached archive into the image storage"
    skopeo copy --quiet "oci-archive:$cached" "$storage_ref$ref"
  else
    # Free the disk before writing: the stale archive of this image (gigabytes) goes first, and
    # the push needs the image's size again in temporary space.
    forget_older "$ref_repo" "$tag" "$key"
    # With overlay a layer holds only its changes, so the locked dependencies are a cached layer
    # of their own; vfs stores every layer as a full copy (gigabytes each): one layer there.
    local layers=--layers=false
    [ "$driver" = vfs ] || layers=--layers
    local args=(--isolation chroot --format oci "$layers" -f "$repo/$file" -t "$ref"
      --label "dev.distillation.inputs=$key"
      --build-arg "BASE=$base_id" --build-arg "VERSION=$version" --build-arg "UV_VERSION=$uv_version"
      --build-arg "INPUTS=$key"
      --build-arg "UV_CACHE_DIR=/host-uv-cache" -v "$(host_uv_cache):/host-uv-cache")
    [ "$flavor" = "-" ] || args+=(--build-arg "FLAVOR=$flavor")
    [ "$variant" = "-" ] || args+=(--build-arg "IMAGE=$variant")
    local cert
    cert=$(host_pip_cert)
    if [ -n "$cert" ]; then
      args+=(--build-arg "PIP_CERT=/run/distill-pip-cert.pem" -v "$cert:/run/distill-pip-cert.pem:ro")
    fi
    log "$ref: building $file (flavor $flavor, inputs $key)"
    buildah_ build "${args[@]}" "$repo" >&2
    log "$ref: writing the OCI archive"
    rm -f "$cached.tmp"
    buildah_ push --quiet "$ref" "oci-archive:$cached.tmp:$ref" >&2
    mv "$cached.tmp" "$cached"
  fi
  forget_older "$ref_repo" "$tag" "$key"
  rm -f "$out/$archive_name"
  ln "$cached" "$out/$archive_name" 2>/dev/null || cp "$cached" "$out/$archive_name"
  summary+=("$(printf '%-52s %8s MB  %5d s' "$ref" "$(($(stat -c %s "$out/$archive_name") / 1000000))" "$((SECONDS - started))")")
}

build_docker() {
  local name=$1 dockerfile ref_repo tag flavor variant
  read -r dockerfile ref_repo tag flavor variant <<<"$(image_spec "$name")"
  local ref="$ref_repo:$tag" started=$SECONDS args=(--build-arg "VERSION=$version" --build-arg "UV_VERSION=$uv_version")
  [ "$flavor" = "-" ] || args+=(--build-arg "FLAVOR=$flavor")
  [ "$variant" = "-" ] || args+=(--build-arg "IMAGE=$variant")
  log "$ref: docker build images/$dockerfile/Dockerfile"
  DOCKER_BUILDKIT=1 docker build "${args[@]}" -f "$repo/images/$dockerfile/Dockerfile" -t "$ref" "$repo" >&2
  mkdir -p "$out"
  docker save -o "$out/${ref_repo##*/}-$tag.oci.tar" "$ref"
  summary+=("$(printf '%-52s %8s MB  %5d s' "$ref" "$(($(stat -c %s "$out/${ref_repo##*/}-$tag.oci.tar") / 1000000))" "$((SECONDS - started))")")
}

# ---------------------------------------------------------------------------------------------

command=build
case "${1:-}" in
  build) shift ;;
  podman | buildah)
    command=$1
    shift
    ;;
esac

case "$command" in
  podman)
    ensure_tools podman runc
    prepare_storage
    CONTAINERS_CONF="$store_root/containers.conf" exec podman "${podman_flags[@]}" "$@"
    ;;
  buildah)
    ensure_tools buildah
    prepare_storage
    TMPDIR="$store_root/tmp" exec buildah "${storage_flags[@]}" "$@"
    ;;
esac

# shellcheck disable=SC2206 # IMAGES is a space-separated list
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(${IMAGES:-operator runtime runtime-vllm quantize})
for name in "${names[@]}"; do image_spec "$name" >/dev/null; done

builder="${DISTILL_IMAGE_BUILDER:-}"
if [ -z "$builder" ]; then
  if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then builder=docker; else builder=buildah; fi
fi

mkdir -p "$cache/images"
exec 9>"$cache/images/.lock"
flock 9 # one build at a time on this machine's cache

case "$builder" in
  docker)
    for name in "${names[@]}"; do build_docker "$name"; done
    ;;
  buildah)
    [ "$(id -u)" -eq 0 ] || die "the daemonless build runs as root (debootstrap, chroot isolation)"
    ensure_tools debootstrap buildah podman skopeo runc
    prepare_storage
    forget_interrupted_pushes
    base_started=$SECONDS
    base_id=$(base_image)
    log "base image $base_id ready in $((SECONDS - base_started)) s"
    for name in "${names[@]}"; do build_daemonless "$name"; done
    ;;
  *) die "DISTILL_IMAGE_BUILDER=$builder: use docker or buildah" ;;
esac

log "images (OCI archive size, build time) in $out:"
printf '  %s\n' "${summary[@]}" >&2
