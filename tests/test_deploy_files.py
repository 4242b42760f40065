"""The deployment files, checked without a cloud or a Docker engine: what can be checked here, is.

- cluster/aws.yaml, cluster/gcp.yaml go through Ray's own `prepare_config` + `validate_config` (what
  `ray up` does before it touches the cloud): CPU head, GPU worker types on-demand and spot.
- cluster/kuberay/*.yaml use only fields of the KubeRay ray.io/v1 API, request GPUs, name our image.
- Every `python jobs/distill.py ...` command in those files parses with our own flag parser.
- docker/Dockerfile builds on the Ray image of the Ray and Python versions CI tests, and installs the
  package the way CI (the Makefile) does.
"""

from __future__ import annotations

import re
import shlex
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import ray
import yaml

from gdd_ray.config_loader import config_from_args

REPO = Path(__file__).resolve().parent.parent
LAUNCHER = ["cluster/aws.yaml", "cluster/gcp.yaml"]
KUBERAY = ["cluster/kuberay/raycluster.yaml", "cluster/kuberay/rayjob.yaml"]
VERSION = version("gdd-ray")
IMAGE = f"YOUR-REGISTRY/gdd-ray:{VERSION}"  # the tag docker/README.md builds and every config pulls

# Fields of the KubeRay ray.io/v1 API (docs/reference/api.md of ray-project/kuberay) that these files may use.
RAYJOB_SPEC = {
    "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
    "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint", "runtimeEnvYAML",
    "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus", "entrypointNumGpus",
    "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend", "schedule",
}  # fmt: skip
RAYCLUSTER_SPEC = {
    "authOptions", "suspend", "managedBy", "autoscalerOptions", "headServiceAnnotations", "enableInTreeAutoscaling",
    "gcsFaultToleranceOptions", "headGroupSpec", "rayVersion", "workerGroupSpecs",
}  # fmt: skip
HEAD_GROUP = {"template", "headService", "enableIngress", "rayStartParams", "serviceType"}
WORKER_GROUP = {
    "suspend", "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds", "rayStartParams",
    "template", "scaleStrategy", "numOfHosts",
}  # fmt: skip
AUTOSCALER_OPTIONS = {
    "resources", "image", "imagePullPolicy", "securityContext", "idleTimeoutSeconds", "upscalingMode", "version",
    "env", "envFrom", "volumeMounts",
}  # fmt: skip


def load(rel: str):
    return yaml.safe_load((REPO / rel).read_text())


def distill_commands(rel: str) -> list[list[str]]:
    """Every `python jobs/distill.py ...` command in a YAML file: in its comments (shell lines with `\\`
    continuations) and in its `entrypoint` values."""
    lines = [ln.strip()[1:] for ln in (REPO / rel).read_text().splitlines() if ln.strip().startswith("#")]
    texts = [re.sub(r"\\\n", " ", "\n".join(lines))]
    doc = load(rel)
    if isinstance(doc.get("spec"), dict) and "entrypoint" in doc["spec"]:
        texts.append(doc["spec"]["entrypoint"])
    out = []
    for text in texts:
        for m in re.finditer(r"python jobs/distill\.py([^\n]*)", text):
            out.append(shlex.split(m.group(1)))
    return out


def check_distill_args(args: list[str]) -> None:
    cfg = config_from_args(args)  # raises on a flag that does not exist or a bad value
    assert "://" in cfg.out, f"a cluster run needs shared storage, not --out {cfg.out}"
    assert cfg.generate.worker_gpus == 1 and cfg.generate.workers, "ask for GPU actors up front (autoscaling)"


def container_gpus(container: dict) -> int:
    limits = container.get("resources", {}).get("limits", {})
    return int(limits.get("nvidia.com/gpu", 0))


# ---- Ray cluster launcher -------------------------------------------------------------------------------


@pytest.mark.parametrize("rel", LAUNCHER)
def test_cluster_launcher_config_passes_rays_own_validation(rel):
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = load(rel)
    cfg = prepare_config(raw)  # merges the provider's defaults.yaml, as `ray up` does
    validate_config(cfg)  # Ray's JSON schema for cluster configs
    assert cfg["docker"]["image"] == IMAGE
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"]["CPU"] == 0
    workers = {name: t for name, t in types.items() if name != cfg["head_node_type"]}
    gpu_types = {name: t for name, t in workers.items() if t["resources"].get("GPU", 0) >= 1}
    assert gpu_types == workers and len(gpu_types) >= 2
    assert all(t["max_workers"] <= cfg["max_workers"] for t in gpu_types.values())


def _is_spot(provider: str, node_config: dict) -> bool:
    if provider == "aws":
        return node_config.get("InstanceMarketOptions", {}).get("MarketType") == "spot"
    sched = node_config.get("scheduling", {})
    return sched.get("provisioningModel") == "SPOT" or sched.get("preemptible") is True


@pytest.mark.parametrize("rel", LAUNCHER)
def test_cluster_launcher_runs_every_node_with_token_auth(rel):
    """Every container (head and workers) starts Ray with RAY_AUTH_MODE=token and gets the token file; the
    submit commands shown send it."""
    cfg = load(rel)
    assert "--env RAY_AUTH_MODE=token" in cfg["docker"]["run_options"]
    assert cfg["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    for node_type in cfg["available_node_types"].values():
        assert "docker" not in node_type or "RAY_AUTH_MODE=disabled" not in str(node_type["docker"])
    text = (REPO / rel).read_text()
    assert "ray get-auth-token --generate" in text
    submits = [ln for ln in text.splitlines() if "ray job submit" in ln and "RAY_ADDRESS" in ln]
    assert submits and all("RAY_AUTH_MODE=token" in ln for ln in submits)


@pytest.mark.parametrize("rel", KUBERAY + LAUNCHER)
def test_no_deploy_file_turns_auth_off(rel):
    assert "RAY_AUTH_MODE=disabled" not in (REPO / rel).read_text()
    assert "mode: disabled" not in (REPO / rel).read_text()


@pytest.mark.parametrize("rel", LAUNCHER)
def test_cluster_launcher_has_on_demand_and_spot_gpu_workers(rel):
    cfg = load(rel)
    provider = cfg["provider"]["type"]
    kinds = [
        _is_spot(provider, t["node_config"])
        for name, t in cfg["available_node_types"].items()
        if name != cfg["head_node_type"]
    ]
    assert sorted(set(kinds)) == [False, True]
    assert cfg["provider"]["cache_stopped_nodes"] is False  # spot nodes cannot be stopped and restarted
    if provider == "gcp":  # GPU VMs cannot live-migrate
        for name, t in cfg["available_node_types"].items():
            if name != cfg["head_node_type"]:
                assert t["node_config"]["scheduling"]["onHostMaintenance"] == "TERMINATE"


@pytest.mark.parametrize("rel", LAUNCHER + KUBERAY)
def test_every_distill_command_in_the_deploy_files_parses(rel):
    commands = distill_commands(rel)
    assert commands, f"{rel} shows no `python jobs/distill.py` command"
    for args in commands:
        check_distill_args(args)


# ---- KubeRay ----------------------------------------------------------------------------------------------


def _check_cluster_spec(spec: dict) -> None:
    assert set(spec) <= RAYCLUSTER_SPEC, set(spec) - RAYCLUSTER_SPEC
    # No dashboard without authentication: anyone reaching port 8265 could run code on every node.
    assert spec.get("authOptions", {}).get("mode") == "token", "the cluster must run with token authentication"
    assert spec["rayVersion"] == ray.__version__
    assert set(spec.get("autoscalerOptions", {})) <= AUTOSCALER_OPTIONS
    head = spec["headGroupSpec"]
    assert set(head) <= HEAD_GROUP, set(head) - HEAD_GROUP
    assert head["rayStartParams"]["num-cpus"] == "0"
    (head_c,) = head["template"]["spec"]["containers"]
    assert head_c["image"] == IMAGE and container_gpus(head_c) == 0
    assert spec["workerGroupSpecs"]
    for group in spec["workerGroupSpecs"]:
        assert set(group) <= WORKER_GROUP, set(group) - WORKER_GROUP
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        (c,) = group["template"]["spec"]["containers"]
        assert c["image"] == IMAGE and container_gpus(c) == 1
        assert c["resources"]["requests"]["nvidia.com/gpu"] == c["resources"]["limits"]["nvidia.com/gpu"]
        # torch.compile's cache: the pod's own folder (an emptyDir) where TORCHINDUCTOR_CACHE_DIR points, never a
        # node's hostPath that later pods would load code from
        env = {e["name"]: e["value"] for e in c.get("env", [])}
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
        (name,) = [n for n, path in mounts.items() if path == env["TORCHINDUCTOR_CACHE_DIR"]]
        assert set(volumes[name]) == {"name", "emptyDir"}
    for template in pod_templates(spec):
        _check_pod_security(template)
    assert spec["enableInTreeAutoscaling"] is False or _locked_down(spec["autoscalerOptions"]["securityContext"])


def pod_templates(spec: dict) -> list[dict]:
    return [spec["headGroupSpec"]["template"], *(g["template"] for g in spec["workerGroupSpecs"])]


def _locked_down(ctx: dict) -> bool:
    return (
        ctx.get("allowPrivilegeEscalation") is False
        and not ctx.get("privileged")
        and ctx["capabilities"]["drop"] == ["ALL"]
    )


def _check_pod_security(template: dict) -> None:
    """Non-root (the image's user), the default seccomp filter, no privilege or capability in any container, no
    hostPath volume, and the label the NetworkPolicy lets in."""
    pod = template["spec"]
    ctx = pod["securityContext"]
    assert (
        ctx["runAsNonRoot"] is True and ctx["runAsUser"] == 1000 and ctx["seccompProfile"] == {"type": "RuntimeDefault"}
    )
    assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC")
    for c in pod["containers"]:
        assert _locked_down(c["securityContext"]), c["name"]
        assert c["securityContext"].get("runAsUser", 1000) != 0
    assert not [v for v in pod.get("volumes", []) if "hostPath" in v]
    assert template["metadata"]["labels"] == network_policy()["spec"]["podSelector"]["matchLabels"]


def network_policy() -> dict:
    return load("cluster/kuberay/networkpolicy.yaml")


def test_network_policy_lets_in_the_cluster_and_the_token_port_only():
    """Ingress to the cluster's pods: from its own pods (any port), else only 8265 (token authentication); no
    metrics port, no GCS, no Ray Client from anywhere else. Both KubeRay files tell to apply it first."""
    doc = network_policy()
    assert (doc["apiVersion"], doc["kind"]) == ("networking.k8s.io/v1", "NetworkPolicy")
    spec = doc["spec"]
    assert spec["policyTypes"] == ["Ingress"]
    own = spec["podSelector"]
    rules = spec["ingress"]
    assert {"from": [{"podSelector": own}]} in rules
    others = [r for r in rules if r != {"from": [{"podSelector": own}]}]
    assert others and all(r["ports"] == [{"port": 8265, "protocol": "TCP"}] for r in others)
    for rel in KUBERAY:
        assert "kubectl apply -f cluster/kuberay/networkpolicy.yaml" in (REPO / rel).read_text()


def test_raycluster_manifest():
    doc = load("cluster/kuberay/raycluster.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayCluster")
    _check_cluster_spec(doc["spec"])
    groups = doc["spec"]["workerGroupSpecs"]
    spot = [g for g in groups if g["template"]["spec"].get("nodeSelector")]
    assert spot and len(spot) < len(groups)  # a spot group and an on-demand one


def test_rayjob_manifest_runs_distill_on_its_own_cluster():
    doc = load("cluster/kuberay/rayjob.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob")
    spec = doc["spec"]
    assert set(spec) <= RAYJOB_SPEC, set(spec) - RAYJOB_SPEC
    _check_cluster_spec(spec["rayClusterSpec"])
    assert spec["shutdownAfterJobFinishes"] is True
    entry = spec["entrypoint"]
    assert entry.startswith(f"cd {dockerfile_workdir()} && python jobs/distill.py ")
    check_distill_args(shlex.split(entry.split("python jobs/distill.py", 1)[1]))


# ---- Docker -------------------------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    lines, buf = [], ""
    for raw in (REPO / "docker/Dockerfile").read_text().splitlines():
        if not buf and (not raw.strip() or raw.lstrip().startswith("#")):
            continue
        if raw.rstrip().endswith("\\"):
            buf += raw.rstrip()[:-1] + " "
            continue
        lines.append(buf + raw)
        buf = ""
    out = []
    for line in lines:
        op, _, rest = line.strip().partition(" ")
        out.append((op.upper(), rest.strip()))
    return out


def dockerfile_workdir() -> str:
    return [a for op, a in dockerfile_instructions() if op == "WORKDIR"][-1]


def pip_install_targets(command: str) -> list[list[str]]:
    """The non-option arguments of each `pip install` in a shell command, keeping `-e TARGET` pairs."""
    out = []
    for part in re.split(r"&&|;", command):
        if "pip install" not in part:
            continue
        words = shlex.split(part)
        if "pip" not in words or "install" not in words:
            continue
        args = words[words.index("install") + 1 :]
        targets, i = [], 0
        while i < len(args):
            if args[i] == "-e":
                targets.append(["-e", args[i + 1]])
                i += 2
                continue
            if args[i] in ("-c", "--constraint"):  # an option's value, not a target
                i += 2
                continue
            if not args[i].startswith("-"):
                targets.append([args[i]])
            i += 1
        out.append(targets)
    return out


def test_dockerfile_base_matches_the_tested_ray_and_python():
    ins = dockerfile_instructions()
    args = dict(a.split("=", 1) for op, a in ins if op == "ARG" and "=" in a)
    base = args["RAY_IMAGE"]
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    assert base == f"rayproject/ray:{ray.__version__}-{py}-gpu", base  # CI's Ray and Python, CUDA flavour
    # By digest: no default tag-only build. A digest recorded as the default must be a sha256 one.
    assert ins[[op for op, _ in ins].index("FROM")] == ("FROM", "${RAY_IMAGE}@${RAY_IMAGE_DIGEST}")
    digest = args.get("RAY_IMAGE_DIGEST")
    assert digest is None or re.fullmatch(r"sha256:[0-9a-f]{64}", digest), digest
    assert f"ray.__version__ == '{ray.__version__}'" in (REPO / "docker/Dockerfile").read_text()


def test_dockerfile_installs_the_package_the_way_ci_does():
    makefile = (REPO / "Makefile").read_text()
    ci = [t for line in makefile.splitlines() for t in pip_install_targets(line.replace("$(PY) -m ", ""))]
    ci_editable = [t for targets in ci for t in targets if t[0] == "-e"]
    assert ci_editable == [["-e", ".[test]"]], ci_editable  # CI: pip install -e '.[test]' in the checkout
    runs = [a for op, a in dockerfile_instructions() if op == "RUN"]
    docker = [t for r in runs for targets in pip_install_targets(r) for t in targets]
    assert docker and all(t[0] == "-e" for t in docker), docker  # only the package itself, editable
    for _, target in docker:
        path, _, extras = target.partition("[")
        assert path == "." and set(extras.rstrip("]").split(",")) - {""} <= {"test"}
    # Code lives where the install ran from, where the RayJob entrypoint cds to.
    assert dockerfile_workdir() == "/app"


def test_dockerfile_copies_exist_and_are_in_the_build_context():
    copies = [a for op, a in dockerfile_instructions() if op == "COPY"]
    sources = [s for c in copies for s in shlex.split(c)[:-1] if not s.startswith("--")]
    assert {"pyproject.toml", "gdd_ray", "jobs"} <= set(sources)
    for s in sources:
        assert (REPO / s).exists(), s
    ignore = (REPO / "docker/Dockerfile.dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert "*" in ignore and set(sources) <= allowed


def test_the_image_installs_the_tested_versions():
    """docker/constraints.txt pins every direct dependency of pyproject.toml exactly (within its range) and Ray at
    the version under test; the dependency layer installs under it. (`python docker/constraints.py --check`
    compares the whole file, 123 transitive packages, with the environment it runs in.)"""
    import tomllib
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (REPO / "docker/constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version and re.fullmatch(r"[0-9A-Za-z.]+", version), line
            pins[canonicalize_name(name)] = version
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in map(Requirement, deps):
        assert dep.specifier.contains(pins[canonicalize_name(dep.name)]), (dep, pins.get(dep.name))
    assert pins["ray"] == ray.__version__
    runs = [a for op, a in dockerfile_instructions() if op == "RUN" and "pip install" in a]
    assert "-c docker/constraints.txt -e ." in runs[0]
    copies = [a for op, a in dockerfile_instructions() if op == "COPY"]
    assert any("docker/constraints.txt" in c for c in copies)
