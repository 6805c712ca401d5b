"""The pod, run as specified: the Deployment of the all-enabled Kubernetes project, read from
`kubectl kustomize`, started without a container engine and driven by a harness that plays
kubelet and the Service with the manifests' own numbers.

The container (`sandbox`): its command, in the runtime stage of the Dockerfile rebuilt on disk
(WORKDIR with the files the stage copies and the virtualenv `uv sync --locked --no-dev
--no-editable` makes, the stage's ENV), its environment from the ConfigMap and from a Secret that
`kubectl create secret generic --from-env-file` makes out of `.env` as the guide says, run by
bubblewrap: the host's root bound read-only, a tmpfs (mode 0777, as kubelet makes an emptyDir)
on each emptyDir mount and on /dev/shm (the runtime's), a PID namespace in which gunicorn is
PID 1, and the securityContext's uid and gid with every capability dropped (bubblewrap sets
no_new_privs). One change, said where it is made: each pod gets loopback ports of its
own in BIND and METRICS_BIND (the manifest's host part kept), and the probes ask BIND's. Not
reproduced: the RuntimeDefault seccomp profile, CPU and memory limits, the network namespace.

The harness (`Kubelet`, `Balancer`): the startup probe until it passes, within
initialDelaySeconds + failureThreshold x periodSeconds, then liveness and readiness at their
periods with their thresholds; the Service's endpoints follow readiness and pod deletion with a
propagation delay (PROPAGATION_S), and a round-robin HTTP balancer in this process sends each
request to a ready endpoint only, over kept-alive upstream connections, as ingress-nginx does.
A deleted pod is taken out as Kubernetes does: endpoint removal and, at the same time, the
preStop sleep, then SIGTERM to PID 1, then up to terminationGracePeriodSeconds (counted from
the deletion) before SIGKILL.

Needs bubblewrap (`bash scripts/test` installs it). As root, setpriv switches to the pod's uid
and gid for real; run by another user, a user namespace maps them to that user (USERNS), as a
rootless container engine does: the process is the pod's uid inside, the user's outside.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO

import pytest
import yaml

from ..drills_support import PostgresInstance, load_generator, report
from ..helpers import (
    ALL_ENABLED,
    Combo,
    free_port,
    json_lines,
    python_for,
    run,
    started,
)
from ..servers import Postgres, Redis
from ..services import children_of, http_request
from .support import Generated, dockerfile_env, dockerfile_instructions, tool, uv
from .test_kubernetes import build, by_kind, guide_secret_keys, optional_secrets

pytestmark = pytest.mark.deploy

COMBO = ALL_ENABLED["kubernetes"]
# How long a change of the Service's endpoints takes to reach the balancer: the EndpointSlice
# update, then ingress-nginx's (or kube-proxy's) next sync; a second or two in a healthy
# cluster. The preStop sleep exists to cover it.
PROPAGATION_S = 2.0
# The PATH of the python image, which the Dockerfile's ENV PATH extends.
IMAGE_BASE_PATH = "/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin"
# Where the image's files are written: outside every emptyDir mount (the pod's /tmp hides the
# host's) and readable by the pod's uid.
IMAGE_PARENT = Path("/var/tmp")
ROLLING_UPDATE_MIN_REQUESTS = 5000
LOAD_CONNECTIONS = 16
# Not root: the pod's uid comes from a user namespace (see sandbox).
USERNS = os.geteuid() != 0


# ---------------------------------------------------------------- the image, without Docker


@dataclass
class Image:
    """The runtime stage of the Dockerfile on the host: `workdir` stands for its WORKDIR."""

    root: Path
    workdir: Path
    env: dict[str, str]
    home: str
    python_prefix: Path


def build_image(project: Generated) -> Image:
    """The runtime stage's files: WORKDIR with what its COPY instructions copy (the builder's
    virtualenv made here by the builder's own `uv sync`), its ENV (PATH and WORKDIR mapped),
    and the home directory of its user."""
    dockerfile = project.read("Dockerfile")
    instructions = dockerfile_instructions(dockerfile)
    last_from = max(i for i, (ins, _) in enumerate(instructions) if ins == "FROM")
    runtime = instructions[last_from:]
    (workdir,) = [a for i, a in runtime if i == "WORKDIR"]
    assert "uv sync --locked --no-dev --no-install-project" in dockerfile, "the builder changed"
    assert "uv pip install --no-deps --target /service ." in dockerfile, "the builder changed"

    for parent in (IMAGE_PARENT, *IMAGE_PARENT.parents):
        if not parent.stat().st_mode & stat.S_IXOTH:
            pytest.fail(f"{parent} is not traversable by others: the pod's uid cannot reach it")
    root = Path(tempfile.mkdtemp(prefix="k8s-pod-image-", dir=IMAGE_PARENT))
    root.chmod(0o755)
    app = root / workdir.lstrip("/")
    app.mkdir(parents=True)
    for directory in (app, *app.parents):
        if directory == root:
            break
        directory.chmod(0o755)

    python = python_for(project.combo.python_version)
    env = {k: v for k, v in os.environ.items() if k != "UV_PROJECT_ENVIRONMENT"}
    env["UV_PYTHON_DOWNLOADS"] = "never"
    if not (project.path / "uv.lock").exists():  # the `uv lock` the user runs once
        run([uv(), "lock", "--python", str(python)], cwd=project.path, env=env)
    venv_mount = f"--mount=type=bind,from=dependencies,source={workdir}/.venv,target=/mnt/venv"
    for ins, args in runtime:
        parts = args.split()
        if ins == "RUN" and parts[0] == venv_mount:
            # The dependencies' virtualenv (copied from the stage mounted) and the service, made
            # as the builder stages make them.
            assert parts[1:] == ["cp", "-a", "/mnt/venv/.", f"{workdir}/.venv/"], args
            run(
                [
                    uv(),
                    "sync",
                    "--locked",
                    "--no-dev",
                    "--no-editable",
                    "--compile-bytecode",
                    "--python",
                    str(python),
                ],
                cwd=project.path,
                env={**env, "UV_PROJECT_ENVIRONMENT": str(app / ".venv")},
            )
            continue
        if ins != "COPY":
            continue
        if parts[0] == "--from=service":
            # The service's own files, installed by the build stage into /service: the sync
            # above installs them where this copies them.
            assert parts[1] == "/service" and parts[2].startswith(f"{workdir}/.venv/"), args
            continue
        if parts[0] == "--from=dependencies":
            # The virtualenv's digest, which keys the copy above in the builder's cache.
            assert parts[1:] == [f"{workdir}/venv.sha256", f"{workdir}/.venv/"], args
            continue
        assert not parts[0].startswith("--from="), args
        *sources, target = parts
        destination = app / target.removeprefix("./").removeprefix(workdir).lstrip("/")
        for source in sources:
            path = project.path / source
            if path.is_dir():
                shutil.copytree(path, destination, dirs_exist_ok=True)
            else:
                destination.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, destination / path.name)

    image_env = dockerfile_env(dockerfile)
    image_env["PATH"] = image_env["PATH"].replace("$PATH", IMAGE_BASE_PATH)
    image_env["PATH"] = image_env["PATH"].replace(f"{workdir}/", f"{app}/")
    home = re.search(r"--home-dir (\S+)", dockerfile)
    return Image(root, app, image_env, home.group(1) if home else "/", python.parents[1])


# ---------------------------------------------------------------- the pod spec


@dataclass(frozen=True)
class Probe:
    kind: str
    path: str
    port: int
    period: int
    timeout: int
    failure_threshold: int
    success_threshold: int
    initial_delay: int

    @property
    def budget(self) -> int:
        """How long kubelet gives the startup probe before it restarts the container."""
        return self.initial_delay + self.failure_threshold * self.period


@dataclass
class Container:
    """A container of a pod template, with what it gets at run time resolved."""

    name: str
    command: list[str]
    env: dict[str, str]
    uid: int
    gid: int
    writable: list[str]
    probes: dict[str, Probe]
    pre_stop_sleep: int
    grace: int


def _probe(kind: str, spec: dict[str, Any], ports: dict[str, int]) -> Probe:
    get = spec["httpGet"]
    assert get.get("scheme", "HTTP") == "HTTP" and not get.get("host"), get
    return Probe(
        kind=kind,
        path=get["path"],
        port=ports.get(get["port"], get["port"]),
        # Kubernetes' defaults for what a probe leaves out.
        period=spec.get("periodSeconds", 10),
        timeout=spec.get("timeoutSeconds", 1),
        failure_threshold=spec.get("failureThreshold", 3),
        success_threshold=spec.get("successThreshold", 1),
        initial_delay=spec.get("initialDelaySeconds", 0),
    )


def container_spec(
    resource: dict[str, Any],
    configmaps: dict[str, dict[str, str]],
    secrets: dict[str, dict[str, str]],
    image: Image,
) -> Container:
    """The one container of a Deployment's or Job's pod template. The environment as the
    runtime builds it: the image's ENV, then each envFrom source in order, then env (later
    wins). Only what the sandbox can reproduce faithfully is accepted; anything else fails."""
    pod = resource["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert not pod.get("initContainers"), "the sandbox runs one container"

    env = dict(image.env)
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(configmaps[source["configMapRef"]["name"]])
        else:
            env.update(secrets[source["secretRef"]["name"]])
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
        elif "secretKeyRef" in item.get("valueFrom", {}):
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = secrets[ref["name"]][ref["key"]]
        elif "configMapKeyRef" in item.get("valueFrom", {}):
            ref = item["valueFrom"]["configMapKeyRef"]
            env[item["name"]] = configmaps[ref["name"]][ref["key"]]
        else:
            pytest.fail(f"an env entry the sandbox cannot resolve: {item}")
    env.setdefault("HOME", image.home)  # what the runtime sets from the image's user

    context = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
    uid, gid = context["runAsUser"], context["runAsGroup"]
    restricted = {
        "runAsNonRoot": context.get("runAsNonRoot") is True and uid != 0,
        "readOnlyRootFilesystem": context.get("readOnlyRootFilesystem") is True,
        "allowPrivilegeEscalation": context.get("allowPrivilegeEscalation") is False,
        "capabilities": context.get("capabilities") == {"drop": ["ALL"]},
    }
    unsupported = [name for name, ok in restricted.items() if not ok]
    if unsupported:
        pytest.fail(
            f"{container['name']}: the sandbox runs the restricted profile only: {unsupported}"
        )

    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    writable = []
    for mount in container.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        if "emptyDir" not in volume:
            pytest.fail(f"volume {volume} is not an emptyDir: the sandbox has no such thing")
        writable.append(mount["mountPath"])
    for path in writable:
        assert not image.root.is_relative_to(path), f"the emptyDir {path} would hide the image"

    ports = {p["name"]: p["containerPort"] for p in container.get("ports", []) if "name" in p}
    probes = {
        kind: _probe(kind, container[f"{kind}Probe"], ports)
        for kind in ("startup", "liveness", "readiness")
        if f"{kind}Probe" in container
    }
    pre_stop = container.get("lifecycle", {}).get("preStop", {})
    assert set(pre_stop) <= {"sleep"}, f"a preStop the harness does not run: {pre_stop}"
    return Container(
        name=container["name"],
        command=list(container["command"]),
        env=env,
        uid=uid,
        gid=gid,
        writable=writable,
        probes=probes,
        pre_stop_sleep=int(pre_stop.get("sleep", {}).get("seconds", 0)),
        grace=int(pod.get("terminationGracePeriodSeconds", 30)),
    )


def make_secret(
    project: Generated, name: str, changes: dict[str, str], dst: Path
) -> dict[str, str]:
    """The Secret as deploy/README.md makes it: the guide's keys grepped out of `.env` into
    secret.env, edited (the servers the pods reach), then `kubectl create secret generic
    --from-env-file`; returned decoded, as the pod's environment gets it."""
    keys = guide_secret_keys(project)
    lines = [
        line
        for line in project.read(".env").splitlines()
        if line.partition("=")[0] in keys and "=" in line
    ]
    present = {line.partition("=")[0] for line in lines}
    assert present == keys - (optional_secrets(project) - present), "a secret missing from .env"
    edited = [
        f"{key}={changes[key]}" if key in changes else line
        for line in lines
        for key in [line.partition("=")[0]]
    ]
    env_file = dst / "secret.env"
    env_file.write_text("\n".join(edited) + "\n")
    env_file.chmod(0o600)
    out = run(
        [
            tool("kubectl"),
            "create",
            "secret",
            "generic",
            name,
            f"--from-env-file={env_file}",
            "--dry-run=client",
            "-o",
            "yaml",
        ]
    ).stdout
    env_file.unlink()
    data = yaml.safe_load(out).get("data") or {}
    return {key: base64.b64decode(value).decode() for key, value in data.items()}


@dataclass
class Manifests:
    deployment: Container
    migration: Container | None
    ingress_host: str


def read_manifests(
    project: Generated, image: Image, servers: dict[str, str], dst: Path
) -> Manifests:
    """The kustomize build's Deployment (and migration Job), with the Secret made from .env
    pointing at `servers` (DATABASE_URL, REDIS_URL of this run)."""
    built = by_kind(build(project))
    configmaps = {built["ConfigMap"]["metadata"]["name"]: built["ConfigMap"]["data"]}
    (app,) = built["Deployment"]["spec"]["template"]["spec"]["containers"]
    secret_name = next(e["secretRef"]["name"] for e in app["envFrom"] if "secretRef" in e)
    secrets = {secret_name: make_secret(project, secret_name, servers, dst)}
    deployment = container_spec(built["Deployment"], configmaps, secrets, image)
    migration = container_spec(built["Job"], configmaps, secrets, image) if "Job" in built else None
    host = built["Ingress"]["spec"]["rules"][0]["host"]
    return Manifests(deployment, migration, host)


# ---------------------------------------------------------------- the sandbox


def _python_exposure(prefix: Path) -> list[str]:
    """bwrap arguments that let any uid run the interpreter the virtualenv links to (the base
    image's Python), read-only: when one of its ancestors is closed to others (pyenv under
    /root), a read-only tmpfs replaces that ancestor, holding the interpreter's tree alone."""
    closed = [p for p in reversed(prefix.parents) if not p.stat().st_mode & stat.S_IXOTH]
    if not closed:
        return []
    top = closed[0]
    args = ["--tmpfs", str(top)]
    for directory in reversed(prefix.parents):
        if directory.is_relative_to(top) and directory != top:
            args += ["--perms", "0755", "--dir", str(directory)]
    return [*args, "--ro-bind", str(prefix), str(prefix), "--remount-ro", str(top)]


def sandbox(
    container: Container, image: Image, argv: list[str] | None = None, as_root: bool = False
) -> list[str]:
    """The command that runs argv (default: the container's command) as the container runs.

    The uid and gid: as root, setpriv switches to them for real (the host sees the pod's uid);
    otherwise (USERNS) a user namespace maps them to the invoking user, as rootless container
    engines do, and bwrap drops every capability.

    as_root keeps uid 0 (and, as root, its capabilities): only for showing what the checks of
    the confinement catch (test_pod_runs_as_the_deployment_says)."""
    bwrap = shutil.which("bwrap")
    if not bwrap:
        pytest.fail("bwrap not found: `bash scripts/test` installs bubblewrap")
    args = [bwrap, "--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev"]
    args += ["--perms", "1777", "--tmpfs", "/dev/shm"]  # the runtime's, not a volume
    for path in container.writable:
        args += ["--perms", "0777", "--tmpfs", path]  # an emptyDir, as kubelet makes it
    args += _python_exposure(image.python_prefix)
    args += ["--unshare-pid", "--as-pid-1", "--die-with-parent", "--chdir", str(image.workdir)]
    if USERNS:
        uid, gid = (0, 0) if as_root else (container.uid, container.gid)
        args += ["--unshare-user", "--uid", str(uid), "--gid", str(gid), "--cap-drop", "ALL"]
        user = []
    elif as_root:
        user = []
    else:
        user = [
            "/usr/bin/setpriv",
            f"--reuid={container.uid}",
            f"--regid={container.gid}",
            "--clear-groups",
            "--bounding-set=-all",
            "--inh-caps=-all",
        ]
    return [*args, "--", *user, *(argv or container.command)]


# What a process in the sandbox sees of itself, and where it can write.
CONFINEMENT = """\
import errno, json, os, sys
status = dict(line.split(":\\t", 1) for line in open("/proc/self/status").read().splitlines())
writes = {}
for directory in sys.argv[1:]:
    path = os.path.join(directory, f".write-check-{os.getpid()}")
    try:
        with open(path, "x") as handle:
            handle.write("x")
        os.unlink(path)
        writes[directory] = "written"
    except OSError as exc:
        writes[directory] = errno.errorcode[exc.errno]
print(json.dumps({"status": status, "writes": writes}))
"""


def process_status(pid: int) -> dict[str, str]:
    """/proc/PID/status, with Uid and Gid as the process's own user namespace numbers them
    (the same as the host's unless USERNS)."""
    text = Path(f"/proc/{pid}/status").read_text()
    status = dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)
    for field, mapping in (("Uid", "uid_map"), ("Gid", "gid_map")):
        ranges = [
            [int(n) for n in line.split()]
            for line in Path(f"/proc/{pid}/{mapping}").read_text().splitlines()
        ]
        inside = []
        for host_id in map(int, status[field].split()):
            found = [
                first + host_id - outside
                for first, outside, count in ranges
                if outside <= host_id < outside + count
            ]
            inside.append(str(found[0]) if found else "unmapped")
        status[field] = "\t".join(inside)
    return status


def check_identity(status: dict[str, str], container: Container, what: str) -> None:
    """The securityContext's uid and gid (real, effective, saved, file system), no
    supplementary group, no capability in any set, no_new_privs."""
    assert status["Uid"].split() == [str(container.uid)] * 4, f"{what}: Uid {status['Uid']}"
    assert status["Gid"].split() == [str(container.gid)] * 4, f"{what}: Gid {status['Gid']}"
    # In a user namespace (USERNS) the invoking user's supplementary groups cannot be dropped.
    assert USERNS or status["Groups"].strip() == "", f"{what}: Groups {status['Groups']}"
    for capabilities in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(status[capabilities], 16) == 0, f"{what}: {capabilities} {status[capabilities]}"
    assert status["NoNewPrivs"].strip() == "1", f"{what}: NoNewPrivs {status['NoNewPrivs']}"


def check_writes(writes: dict[str, str], container: Container) -> None:
    """Only the emptyDirs (and the runtime's /dev/shm) take a new file; everywhere else the
    root file system is read-only."""
    for directory, outcome in writes.items():
        if directory in container.writable or directory == "/dev/shm":
            assert outcome == "written", f"{directory} must be writable: {outcome}"
        else:
            assert outcome == "EROFS", f"{directory}: {outcome}, expected EROFS (read-only)"


# ---------------------------------------------------------------- kubelet


@dataclass
class ProbeResult:
    at: float
    kind: str
    outcome: str
    ok: bool


@dataclass
class Pod:
    name: str
    process: subprocess.Popen[bytes]
    port: int
    log: Path
    started_at: float

    def pid1(self) -> int:
        """The container's PID 1 (gunicorn's master), as the host numbers it."""
        (pid,) = children_of(self.process.pid)
        return pid


def probe_once(port: int, probe: Probe) -> tuple[bool, str]:
    """An httpGet probe as kubelet sends it: a new connection, its headers, its timeout;
    success is a status from 200 to 399."""
    try:
        response = http_request(
            port,
            "GET",
            probe.path,
            headers={"User-Agent": "kube-probe/1.31", "Accept": "*/*"},
            timeout=probe.timeout,
            host=f"127.0.0.1:{port}",
        )
    except OSError as exc:
        return False, type(exc).__name__
    return 200 <= response.status < 400, str(response.status)


class Kubelet:
    """One pod's probes, as kubelet runs them: the startup probe from the container's start
    every periodSeconds until it passes (or failureThreshold failures: a restart, recorded);
    then liveness and readiness, each on its own at its period. Readiness turns the pod ready
    after successThreshold successes in a row, unready after failureThreshold failures in a row,
    and tells on_ready. Liveness failing failureThreshold times in a row would restart the
    container: recorded in `restarts`. `extra` probes (not in the manifest) run beside them
    and are only recorded, in `unready` under their kind each time they reach failureThreshold
    failures in a row: what a different probe would have made kubelet do."""

    def __init__(
        self,
        pod: Pod,
        probes: dict[str, Probe],
        on_ready: Callable[[bool], None],
        extra: Sequence[Probe] = (),
    ) -> None:
        self.pod = pod
        self.probes = probes
        self.on_ready = on_ready
        self.extra = list(extra)
        self.results: list[ProbeResult] = []
        self.startup_s: float | None = None
        self.startup_failed = False
        self.ready = False
        self.ready_at: float | None = None
        self.unready: dict[str, list[float]] = collections.defaultdict(list)
        self.restarts: list[float] = []
        self.deleted_at: float | None = None
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True)]
        self.threads[0].start()

    def _probe(self, probe: Probe) -> bool:
        ok, outcome = probe_once(self.pod.port, probe)
        self.results.append(ProbeResult(time.monotonic(), probe.kind, outcome, ok))
        return ok

    def _run(self) -> None:
        startup = self.probes["startup"]
        due = self.pod.started_at + startup.initial_delay
        failures = 0
        while True:
            if self.stop.wait(max(0.0, due - time.monotonic())):
                return
            if self._probe(startup):
                self.startup_s = time.monotonic() - self.pod.started_at
                break
            failures += 1
            if failures >= startup.failure_threshold:
                self.startup_failed = True
                return
            due += startup.period
        loops = [(self.probes["liveness"], self._liveness), (self.probes["readiness"], self._ready)]
        loops += [(probe, self._extra) for probe in self.extra]
        for probe, handle in loops:
            thread = threading.Thread(target=self._loop, args=(probe, handle), daemon=True)
            thread.start()
            self.threads.append(thread)

    def _loop(self, probe: Probe, handle: Callable[[Probe, bool, list[int]], None]) -> None:
        due = time.monotonic()
        streak = [0, 0]  # successes, failures in a row
        while not self.stop.is_set():
            ok = self._probe(probe)
            streak = [streak[0] + 1, 0] if ok else [0, streak[1] + 1]
            handle(probe, ok, streak)
            due += probe.period
            self.stop.wait(max(0.0, due - time.monotonic()))

    def _liveness(self, probe: Probe, ok: bool, streak: list[int]) -> None:
        if self.deleted_at is None and streak[1] >= probe.failure_threshold:
            self.restarts.append(time.monotonic())
            streak[1] = 0

    def _ready(self, probe: Probe, ok: bool, streak: list[int]) -> None:
        # A deleted pod's endpoint is gone for good (terminating): readiness no longer moves it.
        deleted = self.deleted_at is not None
        if not self.ready and streak[0] >= probe.success_threshold:
            self.ready, self.ready_at = True, time.monotonic()
            if not deleted:
                self.on_ready(True)
        elif self.ready and streak[1] >= probe.failure_threshold:
            self.ready = False
            self.unready[probe.kind].append(time.monotonic())
            if not deleted:
                self.on_ready(False)

    def _extra(self, probe: Probe, ok: bool, streak: list[int]) -> None:
        if streak[1] == probe.failure_threshold:
            self.unready[probe.kind].append(time.monotonic())

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready:
            if self.startup_failed:
                raise AssertionError(
                    f"{self.pod.name}: the startup probe failed its failureThreshold:\n"
                    f"{self.pod.log.read_text()[-4000:]}"
                )
            if self.pod.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.pod.name}: not ready (exit {self.pod.process.poll()}):\n"
                    f"{self.pod.log.read_text()[-4000:]}"
                )
            time.sleep(0.05)

    def outcomes(self, kind: str, since: float = 0, until: float = float("inf")) -> list[str]:
        return [r.outcome for r in self.results if r.kind == kind and since <= r.at < until]

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=10)


# ---------------------------------------------------------------- the Service


class Balancer:
    """The Service's endpoints as ingress-nginx uses them: each request goes, round-robin, to
    an endpoint ready now, over a kept-alive connection to it (one pool per client connection).

    One failure is retried, as nginx retries it: a request whose upstream connection the
    server closed before sending any byte of a response (gunicorn closes a worker's idle
    kept-alive connections when max_requests recycles it, and one may carry a request by then)
    is sent again once, on a new connection to the next endpoint; each retry is recorded in
    `retries`. Every other failure (a refused connection, a reset after the first byte, a
    timeout, a retry failing again) is answered 502 and recorded in `failures`: stricter than
    ingress-nginx, which would try another endpoint after a refused connection too, so that a
    pod that stops listening while still an endpoint shows as lost requests."""

    def __init__(self) -> None:
        self.endpoints: list[int] = []
        self.lock = threading.Lock()
        self.turn = itertools.count()
        self.served: collections.Counter[int] = collections.Counter()
        self.last_served: dict[int, float] = {}
        self.failures: list[tuple[float, int | None, str]] = []
        self.retries: list[tuple[float, int, str]] = []
        self.changes: list[tuple[float, int, bool]] = []
        self.timers: list[threading.Timer] = []
        self.listener = socket.create_server(("127.0.0.1", free_port()), backlog=256)
        self.port = self.listener.getsockname()[1]
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def set_endpoint(self, port: int, present: bool) -> None:
        """An endpoint change, reaching the balancer PROPAGATION_S later."""

        def apply() -> None:
            with self.lock:
                if present and port not in self.endpoints:
                    self.endpoints.append(port)
                elif not present and port in self.endpoints:
                    self.endpoints.remove(port)
                self.changes.append((time.monotonic(), port, present))

        timer = threading.Timer(PROPAGATION_S, apply)
        timer.daemon = True
        timer.start()
        self.timers.append(timer)

    def wait_endpoints(self, expected: list[int], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while sorted(self.endpoints) != sorted(expected):
            assert time.monotonic() < deadline, f"endpoints {self.endpoints}, expected {expected}"
            time.sleep(0.02)

    def close(self) -> None:
        self.closed = True
        for timer in self.timers:
            timer.cancel()
        self.listener.close()

    def _accept(self) -> None:
        while not self.closed:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _pick(self) -> int | None:
        with self.lock:
            if not self.endpoints:
                return None
            return self.endpoints[next(self.turn) % len(self.endpoints)]

    def _send(
        self, upstreams: dict[int, tuple[socket.socket, BinaryIO]], request: bytes
    ) -> tuple[bytes, int | None]:
        """The response and the endpoint that gave it; or an error response and None."""
        retried = False
        while True:
            port = self._pick()
            if port is None:
                self.failures.append((time.monotonic(), None, "no endpoint"))
                return _error(503), None
            reused = port in upstreams
            try:
                response, keep = _forward(upstreams, port, request)
            except (OSError, ValueError) as exc:
                dropped = upstreams.pop(port, None)
                if dropped:
                    dropped[0].close()
                reason = str(exc) if isinstance(exc, NoResponse) else type(exc).__name__
                reason += " (reused connection)" if reused else ""
                if isinstance(exc, NoResponse) and not retried:
                    self.retries.append((time.monotonic(), port, reason))
                    retried = True
                    continue
                self.failures.append((time.monotonic(), port, reason))
                return _error(502), None
            if not keep:
                upstreams.pop(port)[0].close()
            return response, port

    def _serve(self, conn: socket.socket) -> None:
        client = conn.makefile("rb")
        upstreams: dict[int, tuple[socket.socket, BinaryIO]] = {}
        try:
            while True:
                head = _read_head(client)
                if head is None:
                    return
                # Upstream connections stay open whatever the client asked (nginx's
                # `proxy_set_header Connection ""`); the client's own is closed if it asked.
                lines = head.split(b"\r\n")
                close = any(_header(line, b"connection") == b"close" for line in lines)
                forwarded = b"\r\n".join(x for x in lines if _header(x, b"connection") is None)
                request = forwarded + client.read(_content_length(head))
                response, port = self._send(upstreams, request)
                if port is not None:
                    with self.lock:
                        self.served[port] += 1
                        self.last_served[port] = time.monotonic()
                conn.sendall(response)
                if close:
                    return
        except OSError:
            return  # the client went away
        finally:
            for sock, _ in upstreams.values():
                sock.close()
            conn.close()


class NoResponse(ConnectionError):
    """The upstream connection failed before any byte of the response arrived."""


def _read_head(stream: BinaryIO, first: bytes = b"") -> bytes | None:
    lines = [first] if first else []
    while True:
        line = stream.readline(65536)
        if not line:
            if lines:
                raise ConnectionError("closed mid-head")
            return None
        lines.append(line)
        if line in (b"\r\n", b"\n"):
            return b"".join(lines)


def _header(line: bytes, name: bytes) -> bytes | None:
    """The value of a header line if it is the header `name` (lowercase), else None."""
    key, colon, value = line.partition(b":")
    return value.strip().lower() if colon and key.strip().lower() == name else None


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"transfer-encoding":
            raise ValueError("chunked bodies are not supported by the drill's balancer")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def _forward(
    upstreams: dict[int, tuple[socket.socket, BinaryIO]], port: int, request: bytes
) -> tuple[bytes, bool]:
    if port not in upstreams:
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        upstreams[port] = (sock, sock.makefile("rb"))
    sock, stream = upstreams[port]
    try:
        sock.sendall(request)
        first = stream.readline(65536)
    except (ConnectionResetError, BrokenPipeError) as exc:
        raise NoResponse(type(exc).__name__) from exc
    if not first:
        raise NoResponse("closed before any response byte")
    head = _read_head(stream, first)
    assert head is not None
    body = stream.read(_content_length(head))
    keep = b"\r\nconnection: close\r\n" not in head.lower()
    return head + body, keep


def _error(status: int) -> bytes:
    return f"HTTP/1.1 {status} Balancer\r\nContent-Length: 0\r\n\r\n".encode()


# ---------------------------------------------------------------- pods


@dataclass
class Cluster:
    """What the tests run pods with: the manifests, the image, a directory for logs."""

    manifests: Manifests
    image: Image
    logs: Path
    pods: int = 0

    @contextlib.contextmanager
    def pod(
        self,
        on_ready: Callable[[Pod, bool], None] = lambda pod, ready: None,
        extra: Sequence[Probe] = (),
    ) -> Iterator[tuple[Pod, Kubelet]]:
        """A pod of the Deployment, probed by its own kubelet; stopped (SIGTERM to the
        sandbox, SIGKILL to what is left) when the block ends, whatever happened meanwhile."""
        container = self.manifests.deployment
        self.pods += 1
        name = f"pod-{self.pods}"
        port = free_port()
        env = dict(container.env)
        host, _, bind_port = env["BIND"].rpartition(":")
        probes = container.probes
        assert {p.port for p in probes.values()} == {int(bind_port)}, (probes, env["BIND"])
        env["BIND"] = f"{host}:{port}"  # the one change: ports of its own (pods share
        metrics_host, _, _ = env["METRICS_BIND"].rpartition(":")  # the host's network here)
        env["METRICS_BIND"] = f"{metrics_host}:{free_port()}"
        probes = {kind: _with_port(probe, port) for kind, probe in probes.items()}
        extra_probes = [_with_port(probe, port) for probe in extra]
        log = self.logs / f"{name}.log"
        with started(sandbox(container, self.image), self.image.workdir, env, log) as process:
            pod = Pod(name, process, port, log, time.monotonic())
            kubelet = Kubelet(pod, probes, lambda ready: on_ready(pod, ready), extra_probes)
            try:
                yield pod, kubelet
            finally:
                kubelet.close()


def _with_port(probe: Probe, port: int) -> Probe:
    return Probe(**{**probe.__dict__, "port": port})


def recycled_workers(pod: Pod, since: float) -> int:
    """Workers gunicorn replaced for reaching max_requests since `since` (wall clock)."""
    count = 0
    for raw in json_lines(pod.log):
        with contextlib.suppress(ValueError):
            line = json.loads(raw)
            stamp = datetime.fromisoformat(str(line["timestamp"]).replace("Z", "+00:00"))
            if "Maximum request limit" in str(line.get("event")) and stamp.timestamp() >= since:
                count += 1
    return count


def delete_pod(
    pod: Pod, kubelet: Kubelet, balancer: Balancer | None, pre_stop_sleep: int, grace: int
) -> dict[str, Any]:
    """The pod deleted, as Kubernetes does it: at once its endpoint is removed (reaching the
    balancer PROPAGATION_S later) and the preStop sleep runs; then SIGTERM to PID 1; the grace
    period, counted from the deletion, bounds it all, then SIGKILL."""
    deleted = time.monotonic()
    kubelet.deleted_at = deleted
    if balancer is not None:
        balancer.set_endpoint(pod.port, False)
    pid1 = pod.pid1()
    time.sleep(pre_stop_sleep)
    sigterm = time.monotonic()
    os.kill(pid1, signal.SIGTERM)
    try:
        code = pod.process.wait(timeout=max(0.0, deleted + grace - time.monotonic()))
        killed = False
    except subprocess.TimeoutExpired:
        os.killpg(pod.process.pid, signal.SIGKILL)
        code, killed = pod.process.wait(), True
    return {
        "deleted_at": deleted,
        "sigterm_at": sigterm,
        "exit_code": code,
        "sigkilled": killed,
        "exited_after_deletion_s": round(time.monotonic() - deleted, 3),
        "exited_after_sigterm_s": round(time.monotonic() - sigterm, 3),
    }


@contextlib.contextmanager
def load(
    balancer: Balancer, host: str, path: str, workdir: Path
) -> Iterator[Callable[[], dict[str, Any]]]:
    """tests/drills_load.py through the balancer, kept-alive connections, no retry, until the
    yielded function is called: it stops the load and returns its figures."""
    with load_generator(
        workdir,
        *("--port", str(balancer.port), "--host", host, "--path", path),
        *("--seconds", "300", "--connections", str(LOAD_CONNECTIONS), "--no-retry"),
    ) as finish:
        yield finish


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def image(generated: Callable[[Combo], Generated]) -> Iterator[Image]:
    built = build_image(generated(COMBO))
    try:
        yield built
    finally:
        shutil.rmtree(built.root, ignore_errors=True)


@pytest.fixture
def cluster(
    generated: Callable[[Combo], Generated],
    image: Image,
    postgres: Postgres,
    redis: Redis,
    tmp_path: Path,
) -> Cluster:
    """The manifests with the Secret pointing at this run's PostgreSQL and Redis."""
    servers = {
        "DATABASE_URL": postgres.create_database("k8s_pod"),
        "REDIS_URL": redis.url(14),
    }
    project = generated(COMBO)
    return Cluster(read_manifests(project, image, servers, tmp_path), image, tmp_path)


# ---------------------------------------------------------------- the tests


@pytest.mark.boot
@pytest.mark.xdist_group("k8s-pod")
def test_pod_runs_as_the_deployment_says(request: pytest.FixtureRequest, cluster: Cluster) -> None:
    """The container's confinement, then one pod's life.

    A command in the sandbox reports its identity and tries to create a file in every
    directory that matters: the securityContext's uid and gid, no capability, no_new_privs;
    files only in the emptyDirs and /dev/shm, EROFS everywhere else (the image's WORKDIR, its
    virtualenv, /, /var/tmp). The same command with the uid switch left out and the
    WORKDIR bound writable shows what these checks catch. Then the Deployment's command: the
    startup probe passes within its budget, gunicorn is PID 1 of its namespace and it and its
    WEB_CONCURRENCY workers all run as the uid without capabilities; the service answers with
    the ConfigMap's settings; SIGTERM stops it with exit 0 within the grace period."""
    container, image = cluster.manifests.deployment, cluster.image
    targets = [
        *container.writable,
        "/dev/shm",
        str(image.workdir),
        str(image.workdir / ".venv"),
        "/",
        "/var/tmp",
    ]
    argv = ["python", "-c", CONFINEMENT, *targets]
    env = container.env
    seen = json.loads(run(sandbox(container, image, argv), cwd=image.workdir, env=env).stdout)
    check_identity(seen["status"], container, "a command in the sandbox")
    check_writes(seen["writes"], container)

    # The checks catch a sandbox without the uid switch and with a writable WORKDIR.
    loose = sandbox(container, image, argv, as_root=True)
    loose[loose.index("--unshare-pid") : loose.index("--unshare-pid")] = [
        "--bind",
        str(image.workdir),
        str(image.workdir),
    ]
    lax = json.loads(run(loose, cwd=image.workdir, env=env).stdout)
    with pytest.raises(AssertionError, match="Uid"):
        check_identity(lax["status"], container, "as root")
    with pytest.raises(AssertionError, match=re.escape(str(image.workdir))):
        check_writes(lax["writes"], container)

    startup = container.probes["startup"]
    with cluster.pod() as (pod, kubelet):
        kubelet.wait_ready(timeout=startup.budget + 15)
        assert kubelet.startup_s is not None and kubelet.startup_s <= startup.budget
        pid1 = pod.pid1()
        master = process_status(pid1)
        assert master["NSpid"].split()[-1] == "1", f"gunicorn is not PID 1: {master['NSpid']}"
        check_identity(master, container, "gunicorn's master")
        workers = children_of(pid1)
        assert len(workers) == int(container.env["WEB_CONCURRENCY"]), workers
        for worker in workers:
            check_identity(process_status(worker), container, f"worker {worker}")
        info = http_request(
            pod.port, "GET", "/api/v1/info", host=cluster.manifests.ingress_host
        ).json()
        assert info["environment"] == container.env["ENVIRONMENT"], info
        figures = delete_pod(pod, kubelet, None, 0, container.grace)
        assert figures["exit_code"] == 0 and not figures["sigkilled"], pod.log.read_text()[-3000:]
        assert kubelet.restarts == [], kubelet.results
    report(
        request,
        "k8s-pod-start",
        {
            "startup_probe_passed_after_s": round(kubelet.startup_s, 3),
            "startup_probe_budget_s": startup.budget,
            "startup_probes": len(kubelet.outcomes("startup")),
            "uid": container.uid,
            "workers": len(workers),
            "writable": sorted(d for d, o in seen["writes"].items() if o == "written"),
            "sigterm_to_exit_s": figures["exited_after_sigterm_s"],
        },
    )


def _rollout(
    cluster: Cluster,
    balancer: Balancer,
    stack: contextlib.ExitStack,
    old: tuple[Pod, Kubelet],
    pre_stop_sleep: int,
    workdir: Path,
) -> tuple[dict[str, Any], tuple[Pod, Kubelet]]:
    """One release under steady load: a new pod started, ready, in the endpoints (maxSurge:
    it comes first; maxUnavailable 0: the old pod goes only then); the old pod deleted with
    the given preStop sleep; the load stopped a second after the old pod has exited and its
    endpoint has left the balancer."""
    container = cluster.manifests.deployment
    old_pod, old_kubelet = old
    failures_before, retries_before = len(balancer.failures), len(balancer.retries)
    served_before = collections.Counter(balancer.served)
    since = time.time()

    def follow(pod: Pod, ready: bool) -> None:
        balancer.set_endpoint(pod.port, ready)

    with load(balancer, cluster.manifests.ingress_host, "/api/v1/info", workdir) as finish:
        time.sleep(1)  # steady load on the old pod alone
        new_pod, new_kubelet = stack.enter_context(cluster.pod(follow))
        new_kubelet.wait_ready(timeout=container.probes["startup"].budget + 15)
        balancer.wait_endpoints([old_pod.port, new_pod.port], timeout=PROPAGATION_S + 5)
        served_at_deletion = balancer.served[old_pod.port]
        deletion = delete_pod(old_pod, old_kubelet, balancer, pre_stop_sleep, container.grace)
        balancer.wait_endpoints([new_pod.port], timeout=PROPAGATION_S + 5)
        time.sleep(1)  # the new pod alone
        stats = finish()
    failures = balancer.failures[failures_before:]
    retries = balancer.retries[retries_before:]
    served = balancer.served - served_before
    recycled = {pod.port: recycled_workers(pod, since) for pod in (old_pod, new_pod)}
    removed_at = next(
        at for at, port, present in balancer.changes if port == old_pod.port and not present
    )
    figures = {
        "pre_stop_sleep_s": pre_stop_sleep,
        "endpoint_propagation_s": PROPAGATION_S,
        "connections": LOAD_CONNECTIONS,
        "sent": stats["sent"],
        "ok": stats["ok"],
        "failed": stats["failed"],
        "failure_reasons": stats["reasons"],
        "balancer_failures": collections.Counter(reason for _, _, reason in failures),
        "retried_after_no_response": len(retries),
        "retry_reasons": collections.Counter(reason for _, _, reason in retries),
        "retries_by_pod": {
            pod.name: sum(1 for _, port, _ in retries if port == pod.port)
            for pod in (old_pod, new_pod)
        },
        "workers_recycled_by_max_requests": {
            pod.name: recycled[pod.port] for pod in (old_pod, new_pod)
        },
        "requests_per_second": stats["requests_per_second"],
        "seconds": stats["seconds"],
        "served_by_old_pod": served[old_pod.port],
        "served_by_old_pod_after_deletion": balancer.served[old_pod.port] - served_at_deletion,
        "served_by_new_pod": served[new_pod.port],
        "new_pod_startup_probe_passed_after_s": round(new_kubelet.startup_s or -1, 3),
        "new_pod_ready_after_s": round((new_kubelet.ready_at or 0) - new_pod.started_at, 3),
        "old_pod_last_request_before_sigterm_s": round(
            deletion["sigterm_at"] - balancer.last_served[old_pod.port], 3
        ),
        "endpoint_removed_after_deletion_s": round(removed_at - deletion["deleted_at"], 3),
        "old_pod_exit_code": deletion["exit_code"],
        "old_pod_sigkilled": deletion["sigkilled"],
        "old_pod_exited_after_deletion_s": deletion["exited_after_deletion_s"],
        "grace_period_s": container.grace,
        "failures_after_deletion_s": [
            round(min(at for at, _, _ in failures) - deletion["deleted_at"], 3),
            round(max(at for at, _, _ in failures) - deletion["deleted_at"], 3),
        ]
        if failures
        else [],
    }
    # Whatever the preStop: the pod was stopped gracefully, and no pod ever failed liveness.
    assert not deletion["sigkilled"] and deletion["exit_code"] == 0, old_pod.log.read_text()[-3000:]
    assert deletion["exited_after_deletion_s"] < container.grace
    assert old_kubelet.restarts == [] and new_kubelet.restarts == []
    assert new_kubelet.startup_s is not None
    assert new_kubelet.startup_s <= container.probes["startup"].budget
    assert figures["served_by_old_pod"] and figures["served_by_new_pod"], figures
    return figures, (new_pod, new_kubelet)


@pytest.mark.drills
@pytest.mark.xdist_group("k8s-pod")
def test_rolling_update_loses_no_request(
    request: pytest.FixtureRequest, cluster: Cluster, tmp_path: Path
) -> None:
    """Two releases under steady load (kept-alive connections through the balancer, no
    retry), old and new pod behind it.

    With the Deployment's preStop sleep: no request fails out of at least 5,000, the old pod's
    last request is served before its SIGTERM, it exits 0 within the grace period. The sleep
    is what makes this hold: the endpoint removal takes PROPAGATION_S to reach the balancer,
    and until then new requests still go to the old pod. A request the balancer sent twice
    (nginx's retry, see Balancer) is allowed only where gunicorn recycled a worker
    (max_requests) during the release, at most one per client connection for each: never
    because of the rollout.

    The same harness then rolls out again with the sleep taken out (SIGTERM at the deletion,
    the endpoint still in the balancer for PROPAGATION_S): gunicorn closes its listener and
    its idle kept-alive connections at once, and the requests the balancer sends meanwhile
    fail. That release must lose requests, within that window: the zero above is not the
    harness' blindness."""
    container = cluster.manifests.deployment
    assert container.pre_stop_sleep > PROPAGATION_S, "the model's propagation outlasts the sleep"

    def follow(pod: Pod, ready: bool) -> None:
        balancer.set_endpoint(pod.port, ready)

    balancer = Balancer()
    with contextlib.ExitStack() as stack:
        stack.callback(balancer.close)
        first = stack.enter_context(cluster.pod(follow))
        first[1].wait_ready(timeout=container.probes["startup"].budget + 15)
        balancer.wait_endpoints([first[0].port], timeout=PROPAGATION_S + 5)
        with_sleep, second = _rollout(
            cluster, balancer, stack, first, container.pre_stop_sleep, tmp_path
        )
        report(request, "k8s-rolling-update", with_sleep)
        without_sleep, _ = _rollout(cluster, balancer, stack, second, 0, tmp_path)
        report(request, "k8s-rolling-update-without-prestop", without_sleep)

    assert with_sleep["failed"] == 0 and not with_sleep["balancer_failures"], with_sleep
    # The only requests sent twice were on connections that a worker recycled by max_requests
    # closed (at most one per client connection for each such worker); none on the old pod
    # because of its SIGTERM.
    recycled = with_sleep["workers_recycled_by_max_requests"]
    for name, count in with_sleep["retries_by_pod"].items():
        assert not count or recycled[name], f"{name}: {count} retries, no worker recycled"
    assert with_sleep["retried_after_no_response"] <= LOAD_CONNECTIONS * sum(recycled.values())
    assert with_sleep["sent"] >= ROLLING_UPDATE_MIN_REQUESTS, with_sleep
    assert with_sleep["old_pod_last_request_before_sigterm_s"] > 0, with_sleep

    assert without_sleep["failed"] > 0, without_sleep
    assert without_sleep["failed"] == sum(without_sleep["balancer_failures"].values())
    # Lost between the SIGTERM (at the deletion) and the endpoint's removal from the balancer.
    first, last = without_sleep["failures_after_deletion_s"]
    assert first >= 0 and last <= PROPAGATION_S + 1, without_sleep


@pytest.mark.drills
@pytest.mark.xdist_group("k8s-pod-outage")
def test_postgres_outage_keeps_the_pod_live_and_serving(
    request: pytest.FixtureRequest,
    generated: Callable[[Combo], Generated],
    image: Image,
    redis: Redis,
    tmp_path: Path,
) -> None:
    """PostgreSQL (the drill's own) stopped under a pod behind the balancer, for as long as
    kubelet needs to act on failing probes: failureThreshold x periodSeconds of liveness (a
    restart) and of readiness (out of the Service), whichever is longer.

    The decision of deploy/README.md ("Readiness"): liveness (/health/live) answers 200 at
    every probe, so kubelet never restarts the pod; readiness (/health/serving) too, so the
    endpoint stays and routes without the database keep answering 200 through the balancer;
    /health/ready says 503 naming postgres (Redis ok) and the route that needs the database
    fails. Probes of /health/ready run beside them, one at readiness' numbers and one at
    liveness', and both reach their failureThreshold: with /health/ready as the readiness probe
    the pod, and with one shared database every replica, would have left the Service; as the
    liveness probe, kubelet would have restarted it. Once PostgreSQL is back, /health/ready and
    the database route answer 200 again, in the same processes.

    The migration Job's container runs first, in the same sandbox (its command, its env)."""
    pg = PostgresInstance()
    try:
        pg.start()
        servers = {"DATABASE_URL": pg.url(), "REDIS_URL": redis.url(15)}
        manifests = read_manifests(generated(COMBO), image, servers, tmp_path)
        cluster = Cluster(manifests, image, tmp_path)
        job = manifests.migration
        assert job is not None
        run(sandbox(job, image), cwd=image.workdir, env=job.env)

        container = manifests.deployment
        liveness, readiness = container.probes["liveness"], container.probes["readiness"]
        what_if = [
            Probe(**{**probe.__dict__, "kind": f"{probe.kind}-ready", "path": "/health/ready"})
            for probe in (readiness, liveness)
        ]
        outage_s = max(
            liveness.failure_threshold * liveness.period,
            readiness.failure_threshold * readiness.period,
        )
        balancer = Balancer()

        def follow(pod: Pod, ready: bool) -> None:
            balancer.set_endpoint(pod.port, ready)

        host = {"host": manifests.ingress_host}
        try:
            with cluster.pod(follow, extra=what_if) as (pod, kubelet):
                kubelet.wait_ready(timeout=container.probes["startup"].budget + 15)
                balancer.wait_endpoints([pod.port], timeout=PROPAGATION_S + 5)
                workers = children_of(pod.pid1())
                assert http_request(balancer.port, "GET", "/api/v1/items", **host).status == 200
                assert http_request(balancer.port, "GET", "/health/ready", **host).status == 200

                pg.stop()
                stopped = time.monotonic()
                during: dict[str, collections.Counter[str]] = collections.defaultdict(
                    collections.Counter
                )
                while time.monotonic() - stopped < outage_s + 1:
                    for path in ("/api/v1/info", "/health/ready", "/api/v1/items"):
                        response = http_request(balancer.port, "GET", path, timeout=15, **host)
                        outcome = str(response.status)
                        if path == "/health/ready":
                            checks = sorted(response.json()["checks"].items())
                            outcome += "".join(f" {name}={value}" for name, value in checks)
                        during[path][outcome] += 1
                    time.sleep(0.5)
                ended = time.monotonic()
                pg.start()
                back = time.monotonic()
                deadline = back + 20
                while http_request(balancer.port, "GET", "/health/ready", **host).status != 200:
                    assert time.monotonic() < deadline, "readiness not back after the outage"
                    time.sleep(0.1)
                recovered_s = time.monotonic() - back
                assert http_request(balancer.port, "GET", "/api/v1/items", **host).status == 200
                assert children_of(pod.pid1()) == workers, "workers replaced"
                assert pod.process.poll() is None
                outcomes = {
                    kind: collections.Counter(kubelet.outcomes(kind, stopped, ended))
                    for kind in ("liveness", "readiness", "readiness-ready", "liveness-ready")
                }
                kubelet.close()
        finally:
            balancer.close()
    finally:
        pg.close()

    report(
        request,
        "k8s-postgres-outage",
        {
            "outage_s": round(ended - stopped, 1),
            "probes_during_outage": {k: dict(v) for k, v in outcomes.items()},
            "requests_during_outage": {k: dict(v) for k, v in during.items()},
            "restarts": len(kubelet.restarts),
            "what_if_health_ready": {
                "readiness_would_remove_after_s": [
                    round(at - stopped, 1) for at in kubelet.unready["readiness-ready"]
                ],
                "liveness_would_restart_after_s": [
                    round(at - stopped, 1) for at in kubelet.unready["liveness-ready"]
                ],
            },
            "endpoint_changes": [(port, present) for _, port, present in balancer.changes],
            "ready_again_after_restart_s": round(recovered_s, 3),
        },
    )
    assert outcomes["liveness"] and set(outcomes["liveness"]) == {"200"}, outcomes
    assert sum(outcomes["liveness"].values()) >= liveness.failure_threshold, outcomes
    assert kubelet.restarts == []
    assert set(outcomes["readiness"]) == {"200"}, outcomes
    assert sum(outcomes["readiness"].values()) >= readiness.failure_threshold, outcomes
    assert kubelet.unready["readiness"] == []
    assert [present for _, _, present in balancer.changes] == [True], balancer.changes
    assert set(during["/api/v1/info"]) == {"200"}, during
    assert set(during["/health/ready"]) <= {
        f"503 postgres={failed} redis=ok" for failed in ("error", "timeout")
    }, during
    assert set(during["/api/v1/items"]) == {"500"}, during
    # /health/ready as the probe: out of the Service, and restarted, during the same outage.
    assert set(outcomes["readiness-ready"]) == {"503"}, outcomes
    assert kubelet.unready["readiness-ready"] and kubelet.unready["liveness-ready"], outcomes
