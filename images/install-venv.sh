#!/usr/bin/env bash
# Runs inside an image build (RUN --mount=type=bind of the build context): installs the project
# and the locked dependencies of the given extras into /opt/venv, exactly as uv.lock pins them
# (versions and hashes), with a uv that is installed for the step and removed after it.
#
#   bash images/install-venv.sh SRC [uv sync flags: --extra NAME ...]
#
# Environment (the Dockerfiles' build arguments):
#   UV_VERSION    uv to install (required)
#   UV_CACHE_DIR  uv's download cache: a cache mount, or the host's cache bind-mounted in
#   PIP_CERT      optional: path of a CA bundle mounted into the build for pip and uv
#                 (a TLS-inspecting proxy); it is read, never copied into the image
#   FLAVOR        cuda (default): torch with every CUDA library it links and triton;
#                 cpu: without the GPU-only Python packages (see the README, "Container images")
set -euo pipefail

die() { echo "install-venv: $*" >&2; exit 1; }

[ $# -ge 1 ] || die "usage: install-venv.sh SRC [uv sync flags]"
src=$1
shift
[ -f "$src/uv.lock" ] || die "$src/uv.lock not found: the build context must be the repository root"
: "${UV_VERSION:?install-venv: UV_VERSION is not set}"

if [ -n "${PIP_CERT:-}" ]; then
  [ -r "$PIP_CERT" ] || die "PIP_CERT=$PIP_CERT is not a readable file in the build: mount the CA bundle there (buildah build -v BUNDLE:$PIP_CERT:ro) or leave PIP_CERT empty"
  export PIP_CERT SSL_CERT_FILE="$PIP_CERT"
else
  unset PIP_CERT
fi

flavor_flags=()
case "${FLAVOR:-cuda}" in
  cuda) ;;
  # torch's PyPI wheel links the CUDA libraries (libtorch_cpu needs libcupti, libtorch_cuda the
  # rest), so they stay; triton (GPU kernels) and the CUDA Python bindings are not needed on CPU.
  cpu)
    for pkg in triton cuda-bindings cuda-pathfinder cuda-toolkit; do
      flavor_flags+=(--no-install-package "$pkg")
    done
    ;;
  *) die "FLAVOR=${FLAVOR} is not known: use cuda or cpu" ;;
esac

tools=$(mktemp -d)
trap 'rm -rf "$tools"' EXIT
python3 -m venv "$tools"
"$tools/bin/pip" install --quiet --disable-pip-version-check "uv==$UV_VERSION"

export UV_PROJECT_ENVIRONMENT=/opt/venv UV_LINK_MODE=copy UV_PYTHON_DOWNLOADS=never UV_NO_PROGRESS=1
cd "$src"
# uv keeps the project's built wheel in its cache keyed by pyproject.toml, not by the code: without
# a rebuild, an image of changed code would install the last build's wheel (seen: the runtime
# image ran a stage as it was two commits before).
project_flags=()
case " $* " in
  *" --no-install-project "*) ;;
  *) project_flags=(--reinstall-package distillation-operator) ;;
esac
"$tools/bin/uv" sync --frozen --no-dev --no-editable --python "$(command -v python3)" \
  "${flavor_flags[@]}" "${project_flags[@]}" "$@"
