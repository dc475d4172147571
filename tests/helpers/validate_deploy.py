"""Checks deploy/: the compose file and the Kubernetes manifests are well-formed and consistent.

Exits non-zero with a list of problems. Usage: python3 validate_deploy.py DEPLOY_DIR
"""
import pathlib
import sys

import yaml

deploy = pathlib.Path(sys.argv[1])
problems = []

compose = yaml.safe_load((deploy / "docker-compose.yml").read_text())
services = compose.get("services", {})
declared_volumes = set((compose.get("volumes") or {}).keys())
if not services:
    problems.append("compose: no services")
for name, service in services.items():
    if "image" not in service and "build" not in service:
        problems.append(f"compose: {name} has neither image nor build")
    depends = service.get("depends_on", [])
    for dependency in (depends.keys() if isinstance(depends, dict) else depends):
        if dependency not in services:
            problems.append(f"compose: {name} depends on unknown service {dependency}")
    for volume in service.get("volumes", []):
        source = volume.split(":")[0]
        if source.startswith("."):
            if not (deploy / source).exists():
                problems.append(f"compose: {name} mounts missing file {source}")
        elif source not in declared_volumes:
            problems.append(f"compose: {name} uses undeclared volume {source}")
# The replicated-queue override: every region gets 3 NATS servers and its nodes depend on them.
override = yaml.safe_load((deploy / "docker-compose.jetstream.yml").read_text())
override_services = override.get("services", {})
override_volumes = set((override.get("volumes") or {}).keys())
for name, service in override_services.items():
    if name not in services and "image" not in service and "build" not in service:
        problems.append(f"compose jetstream: {name} has neither image nor build")
    for dependency in service.get("depends_on", []):
        if dependency not in services and dependency not in override_services:
            problems.append(f"compose jetstream: {name} depends on unknown service {dependency}")
    for volume in service.get("volumes", []):
        source = volume.split(":")[0]
        if source.startswith("."):
            if not (deploy / source).exists():
                problems.append(f"compose jetstream: {name} mounts missing file {source}")
        elif source not in declared_volumes | override_volumes:
            problems.append(f"compose jetstream: {name} uses undeclared volume {source}")
for region in ("eu", "us"):
    servers = [name for name in override_services if name.startswith(f"nats-{region}-")]
    if len(servers) != 3:
        problems.append(f"compose jetstream: region {region} needs 3 NATS servers, has {servers}")

for region in ("eu", "us"):
    nodes = [name for name in services if name.startswith(f"meridian-{region}-")]
    if len(nodes) < 2:
        problems.append(f"compose: region {region} needs two meridian nodes, has {nodes}")
    for required in (f"clickhouse-{region}", f"s3-{region}", f"proxy-{region}"):
        if required not in services:
            problems.append(f"compose: missing {required}")
if "postgres" not in services:
    problems.append("compose: missing the shared postgres catalog")

for manifest in sorted((deploy / "kubernetes").glob("*.yaml")):
    documents = [document for document in yaml.safe_load_all(manifest.read_text()) if document]
    kinds = {document.get("kind") for document in documents}
    for document in documents:
        for field in ("apiVersion", "kind", "metadata"):
            if field not in document:
                problems.append(f"{manifest.name}: a document lacks {field}")
    for needed in ("StatefulSet", "Service", "PodDisruptionBudget", "ConfigMap"):
        if needed not in kinds:
            problems.append(f"{manifest.name}: no {needed}")
    for document in documents:
        if document.get("kind") != "StatefulSet":
            continue
        spec = document["spec"]["template"]["spec"]
        container = spec["containers"][0]
        if not container.get("image", "").startswith("meridian"):
            # Another part of the region (its NATS cluster): it needs a volume and a quorum guard.
            if not document["spec"].get("volumeClaimTemplates"):
                problems.append(f"{manifest.name}: {container.get('name')} needs a persistent volume claim")
            continue
        if container.get("readinessProbe", {}).get("httpGet", {}).get("path") != "/readyz":
            problems.append(f"{manifest.name}: readiness must probe /readyz")
        if "preStop" not in container.get("lifecycle", {}):
            problems.append(f"{manifest.name}: no preStop drain")
        if not document["spec"].get("volumeClaimTemplates"):
            problems.append(f"{manifest.name}: the queue needs a persistent volume claim")
        if spec.get("terminationGracePeriodSeconds", 30) < 45:
            problems.append(f"{manifest.name}: the grace period must cover the drain")

alerts = yaml.safe_load((deploy / "prometheus" / "alerts.yml").read_text())
for group in alerts.get("groups", []):
    for rule in group.get("rules", []):
        if "alert" not in rule or "expr" not in rule:
            problems.append(f"alerts: a rule lacks alert or expr: {rule}")

if problems:
    print("\n".join(problems))
    sys.exit(1)
print("deploy/ is consistent")
