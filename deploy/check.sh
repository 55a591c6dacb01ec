#!/usr/bin/env bash
# Check everything under deploy/ offline: the Helm chart rendered with every
# values set in deploy/check/values/ and the kustomize overlay, each object
# validated (kubernetes-validate --strict) and scanned (checkov), YAML linted,
# the alert rules' unit tests and every dashboard query run through promtool,
# and the systemd unit verified.
#
#   deploy/check.sh [OUT]          OUT: where the rendered objects go (a temp dir)
#   deploy/check.sh --regenerate   rewrite deploy/kustomize/{base,components} from the chart
#
# The Python tools (check/requirements.txt, pinned) go into a virtual
# environment under ~/.cache; promtool (apt: prometheus), kubectl (for its
# kustomize), node and npm (the custom resources' schemas) and
# systemd-analyze must be on the machine.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here/.."

venv="${TIDEGATE_DEPLOY_VENV:-$HOME/.cache/tidegate/deploy-venv}"
if [ ! -x "$venv/bin/checkov" ] || ! cmp -s "$here/check/requirements.txt" "$venv/requirements.txt"; then
  echo "== Python tools into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$here/check/requirements.txt"
  cp "$here/check/requirements.txt" "$venv/requirements.txt"
fi
python="$venv/bin/python"
# Helm logs every render's use of the chart's rules file, a link to
# deploy/prometheus/tidegate-rules.yaml (one file, tested once): not news.
render() { "$python" "$here/check/render.py" "$@" 2> >(grep -v 'found symbolic link in path' >&2); }

if [ "${1:-}" = "--regenerate" ]; then
  render kustomize
  exit 0
fi

out="${1:-$(mktemp -d)}"
mkdir -p "$out"
for tool in promtool systemd-analyze kubectl node npm; do
  command -v "$tool" >/dev/null 2>&1 || { echo "check.sh: $tool is needed" >&2; exit 1; }
done

echo "== Helm chart"
render chart "$out/helm"
render kustomize --check

echo "== kustomize"
# The example overlay reads its secrets from files an operator writes; stand
# in for them in a copy.
rm -rf "$out/kustomize-src" && cp -r "$here/kustomize" "$out/kustomize-src"
overlay="$out/kustomize-src/overlays/example"
printf 'amqp://tidegate:example@rabbitmq.messaging.svc:5672/%%2f' >"$overlay/secrets/amqp-url"
printf 'example-admin-token-0123456789' >"$overlay/secrets/admin-token"
printf -- '-----BEGIN CERTIFICATE-----\n(example)\n-----END CERTIFICATE-----\n' >"$overlay/secrets/tls.crt"
printf -- '-----BEGIN PRIVATE KEY-----\n(example)\n-----END PRIVATE KEY-----\n' >"$overlay/secrets/tls.key"
mkdir -p "$out/kustomize"
kubectl kustomize "$out/kustomize-src/base" >"$out/kustomize/base.yaml"
kubectl kustomize "$overlay" >"$out/kustomize/overlay.yaml"
echo "kustomize: base $(grep -c '^kind:' "$out/kustomize/base.yaml") objects, overlay $(grep -c '^kind:' "$out/kustomize/overlay.yaml") objects"

echo "== kubernetes-validate --strict"
# Custom resources (ServiceMonitor, PrometheusRule, ScaledObject, Certificate)
# have no bundled schema here: kubernetes-validate says so (WARN), and they
# are checked against their own schemas next.
find "$out/helm" "$out/kustomize" -name '*.yaml' -print0 | sort -z \
  | xargs -0 "$venv/bin/kubernetes-validate" --strict --quiet

echo "== custom resources against their CRD schemas"
# The schemas come from npm (check/package-lock.json, pinned) into ~/.cache.
node_dir="${TIDEGATE_DEPLOY_NODE:-$HOME/.cache/tidegate/deploy-node}"
if [ ! -d "$node_dir/node_modules" ] || ! cmp -s "$here/check/package-lock.json" "$node_dir/package-lock.json"; then
  mkdir -p "$node_dir"
  cp "$here/check/package.json" "$here/check/package-lock.json" "$node_dir/"
  (cd "$node_dir" && npm ci --silent --no-audit --no-fund --loglevel=error)
fi
cp "$here/check/crds.mjs" "$node_dir/"
find "$out/helm" "$out/kustomize" -name '*.yaml' -print0 | sort -z | xargs -0 node "$node_dir/crds.mjs"

echo "== checkov"
"$venv/bin/checkov" --quiet --compact --skip-download --framework kubernetes \
  --config-file "$here/check/checkov.yaml" -d "$out/helm"
"$venv/bin/checkov" --quiet --compact --skip-download --framework kubernetes \
  --config-file "$here/check/checkov.yaml" -f "$out/kustomize/overlay.yaml"

echo "== yamllint"
"$venv/bin/yamllint" --strict -c "$here/check/yamllint.yaml" deploy "$out/helm" "$out/kustomize"

echo "== Prometheus rules and dashboard queries"
"$python" "$here/check/promql.py"
# The rules the chart and the kustomize component ship are the ones tested.
"$python" - "$out" <<'EOF'
import sys, yaml, pathlib
out = pathlib.Path(sys.argv[1])
tested = yaml.safe_load(pathlib.Path("deploy/prometheus/tidegate-rules.yaml").read_text())
shipped = [out / "helm/autoscaling/prometheusrule-tidegate.yaml",
           pathlib.Path("deploy/kustomize/components/monitoring/prometheusrule-tidegate.yaml")]
for path in shipped:
    spec = yaml.safe_load(path.read_text())["spec"]
    if spec != tested:
        sys.exit(f"{path}: its rules differ from deploy/prometheus/tidegate-rules.yaml")
print(f"PrometheusRule objects carry the tested rules ({len(shipped)} checked)")
EOF

echo "== systemd unit"
root="$out/systemd-root"
mkdir -p "$root/etc/systemd/system" "$root/usr/local/bin" "$root/usr/lib"
ln -sfn /usr/lib/systemd "$root/usr/lib/systemd"
cp "$here/systemd/tidegate.service" "$root/etc/systemd/system/"
# ExecStart must name an executable: the gateway's own binary if one is
# given, else a stand-in.
install -m 0755 "${TIDEGATE_BINARY:-/bin/true}" "$root/usr/local/bin/tidegate"
findings="$(systemd-analyze verify --root="$root" tidegate.service 2>&1 | grep -F 'tidegate' || true)"
if [ -n "$findings" ]; then
  echo "$findings" >&2
  echo "check.sh: systemd-analyze verify found the above in deploy/systemd/tidegate.service" >&2
  exit 1
fi
exposure="$(systemd-analyze security --offline=true --root="$root" tidegate.service 2>/dev/null | sed -n 's/.*Overall exposure level for tidegate.service: //p')"
echo "systemd-analyze verify: no findings; exposure level ${exposure:-unknown}"

echo "== deploy/ checked (rendered objects in $out)"
