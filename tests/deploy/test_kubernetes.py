"""deploy/kubernetes: the manifests checked by the real tools (kubectl's kustomize,
kubernetes-validate for Kubernetes 1.31 and the newest version it bundles, checkov) and against
the files they depend on (the service's routes and settings, gunicorn.conf.py, the Dockerfile,
the CI workflow)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes_validate.utils import latest_version

from ..helpers import Combo
from .support import (
    KUBERNETES,
    Generated,
    check,
    ci_pushed_image,
    dockerfile_instructions,
    params,
    tool,
)

pytestmark = pytest.mark.deploy

# The oldest version the manifests support (the native preStop sleep is GA from 1.30, on by
# default from 1.30; 1.31 is the oldest release still maintained when this was written).
OLDEST = "1.31.0"
# ingress-nginx's upstream-keepalive-timeout (its default): gunicorn must keep idle connections
# open longer, so that ingress-nginx never reuses one gunicorn is closing.
INGRESS_NGINX_UPSTREAM_KEEPALIVE = 60


def manifest_dir(project: Generated) -> Path:
    return project.path / "deploy" / "kubernetes"


def manifest_files(project: Generated) -> list[Path]:
    return sorted(p for p in manifest_dir(project).glob("*.yaml") if p.name != "kustomization.yaml")


def kustomization(project: Generated) -> dict[str, Any]:
    return dict(yaml.safe_load((manifest_dir(project) / "kustomization.yaml").read_text()))


def build(project: Generated) -> list[dict[str, Any]]:
    """`kubectl kustomize deploy/kubernetes`: what `kubectl apply -k` would send."""
    out = check([tool("kubectl"), "kustomize", str(manifest_dir(project))], quiet=False).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def by_kind(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    kinds: dict[str, dict[str, Any]] = {}
    for doc in docs:
        assert doc["kind"] not in kinds, f"two {doc['kind']} resources"
        kinds[doc["kind"]] = doc
    return kinds


def sources(project: Generated) -> dict[str, dict[str, Any]]:
    """The manifests as written, one resource per file, by kind."""
    docs = []
    for path in manifest_files(project):
        found = [d for d in yaml.safe_load_all(path.read_text()) if d]
        assert len(found) == 1, f"{path.name}: one resource per file, found {len(found)}"
        docs += found
    return by_kind(docs)


# ---------------------------------------------------------------- the real tools


def check_kubernetes_validate(files: list[Path], version: str) -> None:
    """kubernetes-validate --strict (unknown fields rejected) on every file; its schemas ship
    with the package, no network."""
    proc = subprocess.run(
        [tool("kubernetes-validate"), "--strict", "--quiet", "-k", version, *map(str, files)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if proc.returncode != 0 or proc.stdout.strip() or proc.stderr.strip():
        raise AssertionError(
            f"kubernetes-validate --strict -k {version} exited {proc.returncode}:\n"
            f"{proc.stdout}{proc.stderr}"
        )


def rendered_file(project: Generated, dst: Path) -> Path:
    """The kustomize build, written out for the tools that read files."""
    dst.write_text(yaml.safe_dump_all(build(project), sort_keys=False))
    return dst


@pytest.mark.parametrize("combo", params(KUBERNETES))
def test_kubernetes_validate(
    generated: Callable[[Combo], Generated], combo: Combo, tmp_path: Path
) -> None:
    """Every manifest, and the kustomize build, is valid for Kubernetes 1.31 and for the newest
    version kubernetes-validate bundles."""
    project = generated(combo)
    files = [*manifest_files(project), rendered_file(project, tmp_path / "rendered.yaml")]
    for version in (OLDEST, f"{latest_version()}.0"):
        check_kubernetes_validate(files, version)


def run_checkov(files: list[Path]) -> list[dict[str, Any]]:
    """checkov, frameworks kubernetes and dockerfile, in one run (its start-up takes seconds);
    --skip-download: the built-in checks only, no network."""
    cmd = [tool("checkov"), "--framework", "kubernetes", "dockerfile", "--skip-download"]
    cmd += ["--compact", "-o", "json"]  # not --quiet: it drops the skipped checks
    for path in files:
        cmd += ["-f", str(path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    try:
        reports = json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise AssertionError(
            f"checkov exited {proc.returncode} without a report:\n{proc.stdout}{proc.stderr}"
        ) from None
    return reports if isinstance(reports, list) else [reports]


def check_checkov(files: list[Path]) -> None:
    """No failed check, no parsing error, both frameworks ran, and every skipped check carries
    a checkov.io/skip annotation with its reason."""
    reports = {r["check_type"]: r for r in run_checkov(files)}
    assert set(reports) == {"kubernetes", "dockerfile"}, f"checkov ran {sorted(reports)}"
    problems = []
    for kind, report in reports.items():
        summary = report["summary"]
        assert summary["passed"] > 0, f"checkov {kind}: no check passed: {summary}"
        if summary["parsing_errors"]:
            problems.append(f"{kind}: {summary['parsing_errors']} parsing errors")
        for failed in report["results"].get("failed_checks", []):
            problems.append(
                f"FAILED {failed['check_id']} {failed['check_name']} in {failed['file_path']}"
                f" ({failed['resource']})"
            )
        for skipped in report["results"].get("skipped_checks", []):
            reason = (skipped.get("check_result") or {}).get("suppress_comment") or ""
            # checkov's stand-in when the annotation gives no reason after `=`.
            if reason.strip() in ("", "No comment provided"):
                problems.append(f"skipped {skipped['check_id']} without a reason: {reason!r}")
    if problems:
        raise AssertionError("checkov:\n" + "\n".join(problems))


@pytest.mark.parametrize("combo", params(KUBERNETES))
def test_checkov(generated: Callable[[Combo], Generated], combo: Combo, tmp_path: Path) -> None:
    project = generated(combo)
    files = [
        *manifest_files(project),
        project.path / "Dockerfile",
        rendered_file(project, tmp_path / "rendered.yaml"),
    ]
    check_checkov(files)


# ---------------------------------------------------------------- consistency


def routes(project: Generated) -> set[str]:
    """The health routes the service declares (health.py: PREFIX + each @router.get)."""
    text = project.read(f"src/{project.package}/health.py")
    prefix = re.search(r'^PREFIX = "([^"]+)"', text, re.M).group(1)
    return {prefix + path for path in re.findall(r'@router\.get\(\s*"([^"]+)"', text)}


def gunicorn_setting(project: Generated, name: str) -> int:
    match = re.search(rf"^{name}\s*=\s*(\d+)$", project.read("gunicorn.conf.py"), re.M)
    assert match, f"gunicorn.conf.py sets no numeric {name}"
    return int(match.group(1))


def known_settings(project: Generated) -> set[str]:
    """The settings the service reads: the fields of settings.py, as environment variables."""
    text = project.read(f"src/{project.package}/settings.py")
    return {name.upper() for name in re.findall(r"^    ([a-z_]+): ", text, re.M)}


def required_settings(project: Generated) -> set[str]:
    """Fields without a default, and SECRET_KEY (refused empty outside development)."""
    text = project.read(f"src/{project.package}/settings.py")
    settings_class = text.split("class Settings(BaseSettings):", 1)[1].split("\n\n\n", 1)[0]
    return {n.upper() for n in re.findall(r"^    ([a-z_]+): [^=\n]+$", settings_class, re.M)} | {
        "SECRET_KEY"
    }


# Secrets the service does not read as settings: the OpenTelemetry SDK reads its headers (often
# the collector's API key) from the environment. Optional: in the Secret when `.env` sets them.
OPTIONAL_SECRETS = {"tracing": {"OTEL_EXPORTER_OTLP_HEADERS"}}


def optional_secrets(project: Generated) -> set[str]:
    return {
        name
        for feature, names in OPTIONAL_SECRETS.items()
        for name in names
        if getattr(project.combo, feature)
    }


def secret_settings(project: Generated) -> set[str]:
    """The SecretStr fields of settings.py, and the optional secrets of the enabled features:
    what belongs in the Secret."""
    text = project.read(f"src/{project.package}/settings.py")
    return {
        n.upper() for n in re.findall(r"^    ([a-z_]+): (?:SecretStr|DatabaseUrl)\b", text, re.M)
    } | optional_secrets(project)


def guide_secret_keys(project: Generated) -> set[str]:
    """The keys the guide puts into the Secret (its grep of .env)."""
    match = re.search(r"grep -E '\^\(([A-Z_|]+)\)=' \.env", project.read("deploy/README.md"))
    assert match, "deploy/README.md: no `grep -E '^(KEY|...)=' .env` making the secret's env file"
    return set(match.group(1).split("|"))


def image_user(project: Generated) -> tuple[int, int]:
    runtime = project.read("Dockerfile").rsplit("\nFROM ", 1)[1]
    users = [a for i, a in dockerfile_instructions(runtime) if i == "USER"]
    uid, gid = users[-1].split(":")
    return int(uid), int(gid)


def pod_containers(resource: dict[str, Any]) -> list[dict[str, Any]]:
    spec = resource["spec"]["template"]["spec"]
    return list(spec.get("initContainers", [])) + list(spec["containers"])


def check_consistency(project: Generated) -> None:
    """What no validator knows: the manifests agree with the service, its image and CI."""
    combo = project.combo
    source = sources(project)
    built = by_kind(build(project))
    kust = kustomization(project)
    deployment, service = built["Deployment"], built["Service"]
    pod = deployment["spec"]["template"]["spec"]
    (app,) = pod["containers"]
    server_labels = deployment["spec"]["selector"]["matchLabels"]

    # kustomization.yaml: every file listed, one image entry, the one place for the tag.
    assert sorted(kust["resources"]) == [p.name for p in manifest_files(project)]
    (image,) = kust["images"]
    for resource in (source["Deployment"], *([source["Job"]] if "Job" in source else [])):
        for container in pod_containers(resource):
            assert container["image"] == image["name"], "an image kustomization.yaml never sets"
    release = f"{image['newName']}:{image['newTag']}"
    for resource in [built["Deployment"], *([built["Job"]] if "Job" in built else [])]:
        assert {c["image"] for c in pod_containers(resource)} == {release}
    # The image CI pushes (OWNER stands for the repository's owner) and its sha-<commit> tags.
    pushed, tags = ci_pushed_image(project)
    assert image["newName"] == pushed, f"kustomization runs {image['newName']}, CI pushes {pushed}"
    assert "type=sha,format=long" in tags and image["newTag"].startswith("sha-")

    # Started as the image starts it.
    cmd = next(
        json.loads(a) for i, a in dockerfile_instructions(project.read("Dockerfile")) if i == "CMD"
    )
    assert app["command"] == cmd

    # Probes: routes the service has, on the port it binds.
    paths = routes(project)
    configmap = built["ConfigMap"]["data"]
    bind_port = int(configmap["BIND"].rsplit(":", 1)[1])
    ports = {p["name"]: p["containerPort"] for p in app["ports"]}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        get = app[probe]["httpGet"]
        assert get["path"] in paths, f"{probe} asks {get['path']}, the service has {paths}"
        assert ports.get(get["port"], get["port"]) == bind_port, f"{probe}: port {get['port']}"
    assert app["livenessProbe"]["httpGet"]["path"] == "/health/live"
    assert app["readinessProbe"]["httpGet"]["path"] == "/health/serving"
    assert ports[service["spec"]["ports"][0]["targetPort"]] == bind_port
    assert service["spec"]["selector"] == server_labels
    # Metrics: the master's own port, scraped by annotation, reached by no Service.
    metrics_port = int(configmap["METRICS_BIND"].rsplit(":", 1)[1])
    assert ports["metrics"] == metrics_port != bind_port
    pod_annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert pod_annotations["prometheus.io/scrape"] == "true"
    assert int(pod_annotations["prometheus.io/port"]) == metrics_port
    assert all(
        ports.get(p["targetPort"], p["targetPort"]) != metrics_port
        for p in service["spec"]["ports"]
    )
    expose = [a for i, a in dockerfile_instructions(project.read("Dockerfile")) if i == "EXPOSE"]
    assert expose == [f"{bind_port} {metrics_port}"]

    # Shutdown: the grace period covers the preStop sleep and gunicorn's graceful_timeout.
    sleep = app["lifecycle"]["preStop"]["sleep"]["seconds"]
    graceful = gunicorn_setting(project, "graceful_timeout")
    assert pod["terminationGracePeriodSeconds"] > sleep + graceful, (
        f"grace {pod['terminationGracePeriodSeconds']} <= preStop {sleep} + graceful {graceful}"
    )
    assert gunicorn_setting(project, "keepalive") > INGRESS_NGINX_UPSTREAM_KEEPALIVE
    annotations = built["Ingress"]["metadata"]["annotations"]
    for name in ("proxy-read-timeout", "proxy-send-timeout"):
        assert int(annotations[f"nginx.ingress.kubernetes.io/{name}"]) > gunicorn_setting(
            project, "timeout"
        )
    body = re.fullmatch(r"(\d+)m", annotations["nginx.ingress.kubernetes.io/proxy-body-size"])
    assert body and int(body.group(1)) * 1024 * 1024 >= int(configmap["MAX_BODY_SIZE"])

    # Settings: every variable set is one the service knows; every required one is provided.
    known = known_settings(project)
    set_here = set(configmap) | {e["name"] for e in app.get("env", [])}
    unknown = set_here - known
    assert not unknown, f"manifests set settings the service does not know: {unknown}"
    secret_keys = guide_secret_keys(project)
    assert secret_keys == secret_settings(project), "the Secret must hold exactly the secrets"
    assert not secret_keys & set(configmap), "a secret in the ConfigMap"
    missing = required_settings(project) - set(configmap) - secret_keys
    assert not missing, f"required settings nobody provides: {missing}"
    env_from = [next(iter(e.values()))["name"] for e in app["envFrom"]]
    assert env_from == [built["ConfigMap"]["metadata"]["name"], project.slug]
    workers = combo.workers or 2
    assert {"name": "WEB_CONCURRENCY", "value": str(workers)} in app["env"]
    memory = int(app["resources"]["limits"]["memory"].removesuffix("Mi"))
    assert memory >= 64 + 150 * workers, f"{memory} MiB for {workers} workers"

    # The restricted Pod Security Standard, with the image's own user.
    uid, gid = image_user(project)
    pods = [built["Deployment"], *([built["Job"]] if "Job" in built else [])]
    for resource in pods:
        spec = resource["spec"]["template"]["spec"]
        assert spec["automountServiceAccountToken"] is False
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        for container in pod_containers(resource):
            context = container["securityContext"]
            assert (context["runAsUser"], context["runAsGroup"]) == (uid, gid)
            assert (
                spec["securityContext"]["runAsUser"],
                spec["securityContext"]["runAsGroup"],
            ) == (
                uid,
                gid,
            )
            assert context["allowPrivilegeEscalation"] is False
            assert context["readOnlyRootFilesystem"] is True
            assert context["capabilities"] == {"drop": ["ALL"]}
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            volumes = {v["name"]: v for v in spec["volumes"]}
            assert "emptyDir" in volumes[mounts["/tmp"]], "/tmp must be a writable emptyDir"
    assert built["ServiceAccount"]["automountServiceAccountToken"] is False
    labels = built["Namespace"]["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"

    # Availability: rollouts and drains never take the last pod; spread over nodes and zones.
    rolling = deployment["spec"]["strategy"]["rollingUpdate"]
    assert rolling["maxUnavailable"] == 0, "a rollout must never take away a serving pod"
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    hpa, pdb = built["HorizontalPodAutoscaler"]["spec"], built["PodDisruptionBudget"]["spec"]
    assert hpa["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert pdb["selector"]["matchLabels"] == server_labels
    for replicas in range(hpa["minReplicas"], hpa["maxReplicas"] + 1):
        if "maxUnavailable" in pdb:
            allowed = min(int(pdb["maxUnavailable"]), replicas)
        else:
            allowed = replicas - int(pdb["minAvailable"])
        assert 1 <= allowed < replicas, f"at {replicas} pods a drain may take {allowed}"
    keys = {c["topologyKey"] for c in pod["topologySpreadConstraints"]}
    assert keys == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}

    # Traffic in only from ingress-nginx, to the pods' port, and from monitoring to the metrics.
    policy = built["NetworkPolicy"]["spec"]
    assert policy["policyTypes"] == ["Ingress"]
    admitted = {}
    for rule in policy["ingress"]:
        (peer,) = rule["from"]
        (port,) = rule["ports"]
        namespace = peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
        admitted[ports.get(port["port"], port["port"])] = namespace
    assert admitted == {bind_port: "ingress-nginx", metrics_port: "monitoring"}, admitted

    # The Ingress: the domain, TLS through cert-manager, to the Service.
    ingress = built["Ingress"]["spec"]
    assert ingress["tls"][0]["hosts"] == [project.domain]
    assert ingress["rules"][0]["host"] == project.domain
    assert "cert-manager.io/cluster-issuer" in annotations
    backend = ingress["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == service["metadata"]["name"]

    # Migrations: a Job of its own (not selected as a server), alembic with DATABASE_URL.
    assert ("Job" in built) == combo.postgres
    if combo.postgres:
        job = built["Job"]
        (migrate,) = job["spec"]["template"]["spec"]["containers"]
        assert migrate["command"] == ["alembic", "upgrade", "head"]
        job_labels = job["spec"]["template"]["metadata"]["labels"]
        assert not server_labels.items() <= job_labels.items(), "the Service would select it"
        assert job["metadata"]["labels"]["app.kubernetes.io/component"] == "migration"
        assert [e["name"] for e in migrate["env"]] == ["DATABASE_URL"]


@pytest.mark.parametrize("combo", params(KUBERNETES))
def test_manifests_agree_with_the_service(
    generated: Callable[[Combo], Generated], combo: Combo
) -> None:
    check_consistency(generated(combo))


def check_guide(project: Generated) -> None:
    """deploy/README.md names what the manifests define: files, resources, labels, the issuer,
    and the numbers it explains."""
    guide = project.read("deploy/README.md")
    built = by_kind(build(project))
    namespace = built["Namespace"]["metadata"]["name"]
    deployment = built["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    (app,) = pod["containers"]
    secret = next(e["secretRef"]["name"] for e in app["envFrom"] if "secretRef" in e)
    ingress = built["Ingress"]
    for text in (
        "kubectl apply -f deploy/kubernetes/namespace.yaml",
        f"kubectl -n {namespace} create secret generic {secret} --from-env-file=secret.env",
        f"rollout status deployment/{deployment['metadata']['name']}",
        f"rollout undo deployment/{deployment['metadata']['name']}",
        f"get clusterissuer {ingress['metadata']['annotations']['cert-manager.io/cluster-issuer']}",
        f"get certificate {ingress['spec']['tls'][0]['secretName']}",
        f"sleeps {app['lifecycle']['preStop']['sleep']['seconds']} s",
        f"terminationGracePeriodSeconds: {pod['terminationGracePeriodSeconds']}",
        f"asks `{app['readinessProbe']['httpGet']['path']}`",
        f"https://{project.domain}/health/ready",
    ):
        assert text in guide, f"deploy/README.md lacks {text!r}"
    for path in re.findall(r"deploy/kubernetes/[\w.-]+\.yaml", guide):
        assert (project.path / path).is_file(), f"deploy/README.md names {path}, which is missing"
    if project.combo.postgres:
        job = built["Job"]
        label = job["metadata"]["labels"]["app.kubernetes.io/component"]
        assert f"-l app.kubernetes.io/component={label}" in guide
        assert f"-l 'app.kubernetes.io/component!={label}'" in guide
        assert f"job/{job['metadata']['name']}" in guide
        assert f"delete job {job['metadata']['name']} --ignore-not-found" in guide


@pytest.mark.parametrize("combo", params(KUBERNETES))
def test_guide_names_what_the_manifests_define(
    generated: Callable[[Combo], Generated], combo: Combo
) -> None:
    check_guide(generated(combo))


def test_guide_check_fails_on_a_broken_copy(
    generated: Callable[[Combo], Generated], tmp_path: Path
) -> None:
    project = generated(next(c for c in KUBERNETES if c.postgres)).copy(tmp_path / "project")
    check_guide(project)
    _edit(project, "deploy/kubernetes/deployment.yaml", "seconds: 10", "seconds: 15")
    with pytest.raises(AssertionError, match="sleeps 15 s"):
        check_guide(project)


# ---------------------------------------------------------------- each check can fail


def _edit(project: Generated, relative: str, old: str, new: str) -> None:
    path = project.path / relative
    text = path.read_text()
    assert old in text, f"{old!r} not in {relative}"
    path.write_text(text.replace(old, new, 1))


BROKEN = [
    (
        "deploy/kubernetes/deployment.yaml",
        "terminationGracePeriodSeconds: 45",
        "terminationGracePeriodSeconds: 40",
        "grace",
    ),
    (
        "deploy/kubernetes/deployment.yaml",
        "path: /health/serving",
        "path: /health/readyz",
        "readinessProbe asks",
    ),
    ("deploy/kubernetes/deployment.yaml", "containerPort: 8000", "containerPort: 8080", "port"),
    ("deploy/kubernetes/deployment.yaml", "runAsUser: 10001", "runAsUser: 1000", "10001"),
    (
        "deploy/kubernetes/deployment.yaml",
        "maxUnavailable: 0",
        "maxUnavailable: 1",
        "never take away",
    ),
    ("deploy/kubernetes/configmap.yaml", "LOG_LEVEL: info", "LOGLEVEL: info", "LOGLEVEL"),
    (
        "deploy/kubernetes/configmap.yaml",
        "  ENVIRONMENT: production\n",
        "  ENVIRONMENT: production\n  SECRET_KEY: x\n",
        "secret",
    ),
    (
        "deploy/kubernetes/kustomization.yaml",
        "newName: ghcr.io/OWNER/",
        "newName: docker.io/OWNER/",
        "CI pushes",
    ),
    ("deploy/kubernetes/pdb.yaml", "maxUnavailable: 1", "minAvailable: 2", "drain"),
    ("gunicorn.conf.py", "graceful_timeout = 30", "graceful_timeout = 40", "grace"),
    ("gunicorn.conf.py", "keepalive = 75", "keepalive = 60", "keepalive"),
]


@pytest.mark.parametrize(
    ("relative", "old", "new", "message"), BROKEN, ids=[f"{r}:{n[:24]}" for r, _, n, _ in BROKEN]
)
def test_consistency_fails_on_a_broken_copy(
    generated: Callable[[Combo], Generated],
    tmp_path: Path,
    relative: str,
    old: str,
    new: str,
    message: str,
) -> None:
    project = generated(KUBERNETES[0]).copy(tmp_path / "project")
    check_consistency(project)
    _edit(project, relative, old, new)
    with pytest.raises(AssertionError, match=message):
        check_consistency(project)


def test_validators_fail_on_broken_copies(
    generated: Callable[[Combo], Generated], tmp_path: Path
) -> None:
    project = generated(KUBERNETES[-1]).copy(tmp_path / "project")
    deployment = manifest_dir(project) / "deployment.yaml"
    text = deployment.read_text()

    # A field Kubernetes does not have (strict), and one 1.31 does not have yet.
    deployment.write_text(text.replace("maxSurge: 25%", "maxSurge: 25%\n      maxSurges: 1"))
    with pytest.raises(AssertionError, match="maxSurges"):
        check_kubernetes_validate([deployment], OLDEST)
    # The restricted profile broken: checkov names the check.
    deployment.write_text(
        text.replace("allowPrivilegeEscalation: false", "allowPrivilegeEscalation: true")
    )
    with pytest.raises(AssertionError, match="FAILED CKV_K8S_20"):
        check_checkov([*manifest_files(project), project.path / "Dockerfile"])
    # A skip without a reason is a failure too.
    deployment.write_text(re.sub(r"(checkov\.io/skip1: CKV_K8S_14)=.*", r"\1", text))
    with pytest.raises(AssertionError, match="CKV_K8S_14 without a reason"):
        check_checkov([*manifest_files(project), project.path / "Dockerfile"])
    shutil.rmtree(project.path)
