"""Checks the deployment files: every Kubernetes manifest against the Kubernetes API schemas
(kubernetes-validate, strict: unknown fields refused), and the compose file's shape (PostgreSQL,
two or more replicas of one build sharing one volume, the database password from the
environment). Writes each Flywheel config the files carry into OUT_DIR, for `flywheel check`.

    deploy_check.py DEPLOY_DIR OUT_DIR
"""
import sys
from pathlib import Path

import kubernetes_validate
import yaml


def fail(message):
    sys.exit(f"deploy check: {message}")


def main(deploy: Path, out: Path):
    manifests = sorted((deploy / "kubernetes").glob("*.yaml"))
    if not manifests:
        fail("no manifests in deploy/kubernetes")
    kinds = []
    configs = 0
    for path in manifests:
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc:
                continue
            try:
                kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
            except kubernetes_validate.ValidationError as e:
                fail(f"{path.name}: {doc.get('kind')}/{doc['metadata']['name']}: {e.message}")
            kinds.append(doc["kind"])
            if doc["kind"] == "ConfigMap" and "flywheel.toml" in doc.get("data", {}):
                configs += 1
                (out / f"k8s-{doc['metadata']['name']}.toml").write_text(doc["data"]["flywheel.toml"])
            if doc["kind"] == "Deployment":
                spec = doc["spec"]["template"]["spec"]
                probe = spec["containers"][0].get("readinessProbe", {})
                if probe.get("httpGet", {}).get("path") != "/readyz":
                    fail("the Deployment's readiness probe is not /readyz")
                if doc["spec"].get("replicas", 1) < 2:
                    fail("the Deployment runs fewer than two replicas")
    for kind in ["Deployment", "Service", "ConfigMap", "Secret", "PersistentVolumeClaim"]:
        if kind not in kinds:
            fail(f"no {kind} among the manifests")
    if configs == 0:
        fail("no ConfigMap carries flywheel.toml")
    print(f"{len(kinds)} Kubernetes resources valid against the {kubernetes_validate.latest_version()} schemas")

    compose = yaml.safe_load((deploy / "compose.yaml").read_text())
    services = compose["services"]
    if "postgres" not in services:
        fail("compose.yaml has no postgres service")
    replicas = [s for n, s in services.items() if n != "postgres"]
    if len(replicas) < 2:
        fail("compose.yaml runs fewer than two replicas")
    for s in replicas:
        if "shared:/var/lib/flywheel/shared" not in s.get("volumes", []):
            fail("a replica does not mount the shared volume")
        if "FLYWHEEL_DB_PASSWORD" not in s.get("environment", {}):
            fail("a replica does not take the database password from the environment")
        if s.get("depends_on", {}).get("postgres", {}).get("condition") != "service_healthy":
            fail("a replica starts before postgres is healthy")
        for mount in s["volumes"]:
            source = mount.split(":")[0]
            if source.startswith("./"):
                (out / f"compose-{Path(source).name}").write_text((deploy / source).read_text())
    print(f"compose.yaml: postgres and {len(replicas)} replicas sharing one volume")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(Path(sys.argv[1]), Path(sys.argv[2]))
