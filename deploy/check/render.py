"""Render Tidegate's Helm chart offline, and keep the kustomize tree in step with it.

    render.py chart OUT        lint the chart, render it with every values set in
                               deploy/check/values/ into OUT/<set>/, check that
                               it refuses what it must, and write the default
                               set's tidegate.toml to OUT/chart-tidegate.toml
    render.py kustomize        write deploy/kustomize/base and components/ from the chart
    render.py kustomize --check  fail if they differ from what the chart renders

Helm comes from PyPI's helm-python-sdk (module helm_python), which embeds Helm.
"""

from __future__ import annotations

import sys
from pathlib import Path

import helm_python
import yaml

DEPLOY = Path(__file__).resolve().parent.parent
CHART = DEPLOY / "helm" / "tidegate"
VALUES = DEPLOY / "check" / "values"
KUSTOMIZE = DEPLOY / "kustomize"
NAME = "tidegate"
NAMESPACE = "tidegate"

# Values the chart must refuse, each with a part of the message it gives.
REFUSED = [
    ({}, "secrets.amqpUrl"),
    ({"secrets": {"amqpUrl": "amqp://x"}, "config": {"queue": {"url": "amqp://u:p@h/"}}},
     "config.queue.url holds the broker's password"),
    ({"secrets": {"amqpUrl": "amqp://x"}, "config": {"admin": {"token": "0123456789abcdef"}}},
     "config.admin.token is a secret"),
    ({"secrets": {"amqpUrl": "amqp://x", "adminToken": "short"}}, "at least 16 characters"),
    ({"secrets": {"amqpUrl": "amqp://x"}, "terminationGracePeriodSeconds": 30},
     "must exceed preStopSleepSeconds"),
    ({"secrets": {"amqpUrl": "amqp://x"}, "config": {"server": {"shutdown_grace_period": "1h30m"}}},
     "write it as seconds"),
    ({"secrets": {"amqpUrl": "amqp://x"}, "autoscaling": {"enabled": True}, "keda": {"enabled": True},
      "networkPolicy": {"enabled": False}}, "choose one"),
    ({"secrets": {"amqpUrl": "amqp://x"}, "workload": "DaemonSet"}, "StatefulSet"),
    ({"secrets": {"amqpUrl": "amqp://x"}, "serviceMonitor": {"enabled": True}},
     "networkPolicy.adminFrom is empty"),
    ({"secrets": {"amqpUrl": "amqp://x"}, "config": {"auth.jwt": {"hs256_secret": "x" * 32}}},
     "a section of tidegate.toml is a plain name"),
]


def fail(message: str) -> None:
    print(f"render.py: {message}", file=sys.stderr)
    sys.exit(1)


def render(values: dict) -> dict[str, str]:
    """The chart's rendered templates by name, without empty ones."""
    chart = helm_python.Chart.load(str(CHART))
    try:
        out = chart.render(values, name=NAME, namespace=NAMESPACE, is_install=True)
    finally:
        chart.close()
    return {name: text for name, text in out.items() if name.endswith(".yaml") and text.strip()}


def objects(rendered: dict[str, str]) -> list[dict]:
    docs = []
    for name in sorted(rendered):
        for doc in yaml.safe_load_all(rendered[name]):
            if doc:
                docs.append(doc)
    return docs


def chart(out: Path) -> None:
    lint = helm_python.lint(str(CHART), yaml.safe_load((VALUES / "default.yaml").read_text()),
                            strict=True)
    if lint.get("errors"):
        fail(f"helm lint: {lint['errors']}")
    for message in lint.get("messages", []):
        # Severity 1 is INFO (such as "icon is recommended").
        if message.get("severity", 0) > 1:
            fail(f"helm lint: {message}")
    sets = sorted(VALUES.glob("*.yaml"))
    for values_file in sets:
        values = yaml.safe_load(values_file.read_text()) or {}
        rendered = render(values)
        target = out / values_file.stem
        target.mkdir(parents=True, exist_ok=True)
        kinds = []
        for doc in objects(rendered):
            kind, name = doc["kind"], doc["metadata"]["name"]
            kinds.append(kind)
            (target / f"{kind.lower()}-{name}.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
        print(f"chart rendered with {values_file.name}: {len(kinds)} objects ({', '.join(sorted(kinds))})")
        if values_file.stem == "default":
            configmap = next(d for d in objects(rendered) if d["kind"] == "ConfigMap")
            (out / "chart-tidegate.toml").write_text(configmap["data"]["tidegate.toml"])
    for values, expected in REFUSED:
        try:
            render(values)
        except helm_python.HelmError as e:
            if expected not in str(e):
                fail(f"values {values} were refused, but not with {expected!r}: {e}")
            continue
        fail(f"values {values} rendered; the chart must refuse them ({expected!r})")
    print(f"chart refused {len(REFUSED)} bad value sets, each with its reason")


# What the kustomize tree holds: the chart rendered with these values, the
# objects of the given kinds. The base has the core objects; components add
# what needs a CRD or a choice.
KUSTOMIZE_VALUES = {"secrets": {"existingSecret": "tidegate-secrets"}}
# What the components' objects need of the chart to render; the base's
# NetworkPolicy is opened for Prometheus by the monitoring component's patch.
PROMETHEUS_NAMESPACE = "monitoring"
ADMIN_FROM = {"networkPolicy": {"adminFrom": [
    {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": PROMETHEUS_NAMESPACE}}}]}}
PARTS = {
    "base": ({}, {"ServiceAccount", "ConfigMap", "Service", "StatefulSet", "PodDisruptionBudget",
                  "NetworkPolicy"}),
    "components/monitoring": ({"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True},
                               **ADMIN_FROM}, {"ServiceMonitor", "PrometheusRule"}),
    "components/autoscaling": ({"autoscaling": {"enabled": True}, **ADMIN_FROM}, {"HorizontalPodAutoscaler"}),
    "components/keda": ({"keda": {"enabled": True}, **ADMIN_FROM}, {"ScaledObject"}),
}
# What a component changes in the base, as JSON patches.
PATCHES = {
    # Prometheus (in the namespace named here: patch it for another) may
    # scrape the admin port.
    "components/monitoring": ("NetworkPolicy", [
        {"op": "add", "path": "/spec/ingress/1/from/-", "value": ADMIN_FROM["networkPolicy"]["adminFrom"][0]},
    ]),
    # The autoscaler owns the replica count: applying the overlay again must
    # not reset it.
    "components/autoscaling": ("StatefulSet", [{"op": "remove", "path": "/spec/replicas"}]),
    "components/keda": ("StatefulSet", [{"op": "remove", "path": "/spec/replicas"}]),
}


def _block_strings(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    """Multi-line strings (the components' patches) as literal blocks."""
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


yaml.SafeDumper.add_representer(str, _block_strings)
HEADER = "# Generated from deploy/helm/tidegate by deploy/check/render.py kustomize; do not edit.\n"


def merged(extra: dict) -> dict:
    values = {k: dict(v) for k, v in KUSTOMIZE_VALUES.items()}
    for key, value in extra.items():
        values[key] = value
    return values


def kustomize_files() -> dict[Path, str]:
    files: dict[Path, str] = {}
    for part, (extra, kinds) in PARTS.items():
        names = []
        for doc in objects(render(merged(extra))):
            if doc["kind"] not in kinds:
                continue
            metadata = doc["metadata"]
            metadata.pop("namespace", None)
            labels = metadata.get("labels", {})
            labels.pop("helm.sh/chart", None)
            if labels.get("app.kubernetes.io/managed-by") == "Helm":
                labels["app.kubernetes.io/managed-by"] = "kustomize"
            name = f"{doc['kind'].lower()}-{metadata['name']}.yaml"
            names.append(name)
            files[KUSTOMIZE / part / name] = HEADER + yaml.safe_dump(doc, sort_keys=False)
        kind = "Kustomization" if part == "base" else "Component"
        api = "kustomize.config.k8s.io/v1beta1" if part == "base" else "kustomize.config.k8s.io/v1alpha1"
        kustomization = {"apiVersion": api, "kind": kind, "resources": sorted(names)}
        if part in PATCHES:
            target, operations = PATCHES[part]
            kustomization["patches"] = [{"target": {"kind": target, "name": NAME},
                                         "patch": yaml.safe_dump(operations, sort_keys=False)}]
        files[KUSTOMIZE / part / "kustomization.yaml"] = HEADER + yaml.safe_dump(kustomization, sort_keys=False)
    return files


def kustomize(check: bool) -> None:
    files = kustomize_files()
    stale = []
    for part in PARTS:
        for existing in (KUSTOMIZE / part).glob("*.yaml"):
            if existing not in files:
                stale.append(existing)
                if not check:
                    existing.unlink()
    for path, text in sorted(files.items()):
        if path.exists() and path.read_text() == text:
            continue
        stale.append(path)
        if not check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if check and stale:
        fail("the kustomize tree differs from the chart: run `deploy/check.sh --regenerate` "
             "(deploy/check/render.py kustomize); stale: "
             + ", ".join(str(p.relative_to(DEPLOY)) for p in stale))
    print(f"kustomize tree {'matches' if check else 'written from'} the chart ({len(files)} files)")


def main() -> None:
    if len(sys.argv) >= 3 and sys.argv[1] == "chart":
        chart(Path(sys.argv[2]))
    elif len(sys.argv) >= 2 and sys.argv[1] == "kustomize":
        kustomize(check="--check" in sys.argv[2:])
    else:
        fail(__doc__)


if __name__ == "__main__":
    main()
