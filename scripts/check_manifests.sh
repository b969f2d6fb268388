#!/usr/bin/env bash
# The Kubernetes manifests in deploy/k8s against the real API schemas:
# kubernetes-validate (PyPI; the schemas of each Kubernetes release bundled,
# so nothing is fetched at check time) in strict mode, which refuses unknown
# fields as well as wrong types and missing required ones. Installed once
# into a cache directory (KEEL_CACHE_DIR, default ~/.cache/keel).
# Usage: scripts/check_manifests.sh [DIR...]   (default: deploy/k8s)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

tool_version=1.37.0
# The oldest Kubernetes release we still claim, and the newest the tool knows.
k8s_versions=${KEEL_K8S_VERSIONS:-"1.33.0 1.37.0"}
venv="${KEEL_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/keel}/kubernetes-validate-$tool_version"
validate="$venv/bin/kubernetes-validate"
if [ ! -x "$validate" ]; then
  log "installing kubernetes-validate $tool_version into $venv"
  python3 -m venv "$venv" || die "python3 -m venv failed (Debian: apt-get install python3-venv)"
  "$venv/bin/pip" install -q --disable-pip-version-check "kubernetes-validate==$tool_version" \
    || { rm -rf "$venv"; die "cannot install kubernetes-validate $tool_version from PyPI: the manifests were NOT checked"; }
fi

dirs=("$@")
[ ${#dirs[@]} -gt 0 ] || dirs=(deploy/k8s)
files=()
for d in "${dirs[@]}"; do
  files+=("$d"/*.yaml)
done
[ -e "${files[0]}" ] || die "no manifests in ${dirs[*]}"

tmp=$(mktemp -d "${TMPDIR:-/tmp}/keel-k8s.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
cat >"$tmp/misspelt.yaml" <<'YAML'
apiVersion: apps/v1
kind: Deployment
metadata: {name: misspelt}
spec:
  selector: {matchLabels: {app: misspelt}}
  template:
    metadata: {labels: {app: misspelt}}
    spec:
      containers:
        - name: misspelt
          image: keel:latest
          ports: [{containerPrt: 50051}]
YAML
for k in $k8s_versions; do
  "$validate" --strict --quiet -k "$k" "${files[@]}" || die "manifests do not validate against Kubernetes $k"
  # The check cannot pass vacuously: a Deployment with a misspelt field is refused.
  if "$validate" --strict --quiet -k "$k" "$tmp/misspelt.yaml" >/dev/null 2>&1; then
    die "kubernetes-validate accepted a misspelt field: the check is not working"
  fi
done
log "manifests: ${#files[@]} files valid against Kubernetes $k8s_versions (kubernetes-validate $tool_version, strict)"
