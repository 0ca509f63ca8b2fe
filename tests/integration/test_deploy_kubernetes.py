"""deploy/kubernetes: every manifest against the Kubernetes JSON schemas (kubernetes-validate
bundles them, so no network is needed), strictly (an unknown or misspelt field fails), and the
mesh's own rules: two controllers with a budget and a service, an agent on every node with the
host's engine and work dir, no RBAC, and command lines the ``tether`` commands accept."""

from __future__ import annotations

import copy
import re

import pytest
import yaml
from deploy_checks import (
    DEPLOY,
    configs_of,
    has_option,
    parse_command_line,
    unavailable,
    unknown_variables,
)

K8S = DEPLOY / "kubernetes"
# The oldest Kubernetes with everything used here (gRPC probes, the PDB's
# unhealthyPodEvictionPolicy), and the newest the validator knows.
VERSIONS = ("1.27.0", "latest")


def _validator():
    try:
        import kubernetes_validate
    except ImportError:
        unavailable("kubernetes-validate is not installed (pip install -e '.[dev]')")
    return kubernetes_validate


def kustomization() -> dict:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def resources() -> list[dict]:
    docs = []
    for name in kustomization()["resources"]:
        docs += [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]
    return docs


def one(kind: str, name: str) -> dict:
    found = [d for d in resources() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def container(workload: dict) -> dict:
    (c,) = workload["spec"]["template"]["spec"]["containers"]
    return c


def env_of(c: dict) -> dict[str, dict | str]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


def test_kustomization_lists_every_manifest():
    listed = kustomization()["resources"]
    on_disk = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(listed) == on_disk
    assert kustomization()["namespace"] == "tether"
    # The image every workload names is the one kustomize rewrites to the user's registry.
    images = {i["name"] for i in kustomization()["images"]}
    for kind, name in (("Deployment", "tether-controller"), ("DaemonSet", "tether-agent")):
        assert container(one(kind, name))["image"] in images


@pytest.mark.parametrize("version", VERSIONS)
def test_manifests_match_the_kubernetes_schemas(version):
    kv = _validator()
    version = kv.latest_version() if version == "latest" else version
    kinds = []
    for doc in resources():
        kv.validate(doc, version, strict=True)  # raises ValidationError naming the field
        kinds.append(doc["kind"])
    assert sorted(kinds) == sorted(
        ["Namespace", "ConfigMap", "Deployment", "Service", "PodDisruptionBudget", "DaemonSet"]
    )


def test_strict_validation_catches_a_misspelt_field():
    kv = _validator()
    deployment = copy.deepcopy(one("Deployment", "tether-controller"))
    deployment["spec"]["replica"] = deployment["spec"].pop("replicas")
    with pytest.raises(kv.ValidationError, match="replica"):
        kv.validate(deployment, kv.latest_version(), strict=True)
    daemonset = copy.deepcopy(one("DaemonSet", "tether-agent"))
    container(daemonset)["ports"][0]["containerPort"] = "9101"
    with pytest.raises(kv.ValidationError):
        kv.validate(daemonset, kv.latest_version(), strict=True)


def test_two_controllers_behind_a_service_and_a_budget():
    deployment = one("Deployment", "tether-controller")
    spec = deployment["spec"]
    assert spec["replicas"] == 2
    pod_labels = spec["template"]["metadata"]["labels"]
    selector = spec["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()
    pdb = one("PodDisruptionBudget", "tether-controller")
    assert pdb["spec"]["selector"]["matchLabels"] == selector
    assert pdb["spec"]["minAvailable"] == 1
    # A rolling update never takes the second controller away while the first is replaced.
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    service = one("Service", "tether-controller")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    ports = {p["name"]: p for p in container(deployment)["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= ports.keys()

    c = container(deployment)
    params = parse_command_line(c["args"])
    grpc_port = int(params["listen"].rpartition(":")[2])
    assert ports["grpc"]["containerPort"] == grpc_port
    assert ports["metrics"]["containerPort"] == int(params["metrics_listen"].rpartition(":")[2])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"]["port"] == grpc_port, probe
    # Each controller advertises its own pod address: where a standby sends callers.
    env = env_of(c)
    assert env["POD_IP"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert env["TETHER_ADVERTISE"] == f"$(POD_IP):{grpc_port}"
    security = c["securityContext"]
    assert security["readOnlyRootFilesystem"] and not security["allowPrivilegeEscalation"]
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True


def test_an_agent_on_every_node_with_the_hosts_engine_and_work_dir():
    daemonset = one("DaemonSet", "tether-agent")
    pod = daemonset["spec"]["template"]["spec"]
    c = container(daemonset)
    env = env_of(c)
    assert env["TETHER_NODE"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    # The controllers check tokens, not node certificates: agents carry one, from a Secret.
    assert env["TETHER_AGENT_TOKEN"] == {
        "secretKeyRef": {"name": "tether-agent-token", "key": "token"}
    }
    controller_args = container(one("Deployment", "tether-controller"))["args"]
    assert "--auth" in controller_args and "TETHER_TLS_CA" not in env
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    socket = volumes[mounts["/var/run/docker.sock"]]["hostPath"]
    assert socket == {"path": "/var/run/docker.sock", "type": "Socket"}
    # The engine mounts attempt directories by their host path: same path inside and out.
    work_dir = env["TETHER_WORK_DIR"]
    assert volumes[mounts[work_dir]]["hostPath"]["path"] == work_dir
    # GPUs: every device visible to the agent's NVML, GPU nodes' taint tolerated.
    assert env["NVIDIA_VISIBLE_DEVICES"] == "all"
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    # Room for the drain (20 s by default) and the stop grace after it.
    params_flags = c["args"]
    assert pod["terminationGracePeriodSeconds"] >= 25
    assert c["livenessProbe"]["httpGet"]["path"] == "/metrics"
    assert "--metrics-listen" in params_flags
    metrics = params_flags[params_flags.index("--metrics-listen") + 1]
    assert metrics == "0.0.0.0:9101"
    assert c["ports"][0]["containerPort"] == 9101


def test_agent_command_line_is_the_agents():
    args = container(one("DaemonSet", "tether-agent"))["args"]
    if not has_option("agent", "--metrics-listen"):
        i = args.index("--metrics-listen")
        parse_command_line(args[:i] + args[i + 2 :])
        pytest.skip("agent --metrics-listen is not on this branch yet (the metrics item adds it)")
    assert parse_command_line(args)["runtime"] == "docker"


def test_no_rbac_and_no_service_account_token():
    kinds = {d["kind"] for d in resources()}
    assert not kinds & {
        "ServiceAccount",
        "Role",
        "ClusterRole",
        "RoleBinding",
        "ClusterRoleBinding",
    }
    for kind, name in (("Deployment", "tether-controller"), ("DaemonSet", "tether-agent")):
        pod = one(kind, name)["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False, name


def test_every_tether_variable_is_read_by_a_command():
    config = one("ConfigMap", "tether-config")["data"]
    assert not unknown_variables(set(config), "controller", "agent")
    for kind, name, command in (
        ("Deployment", "tether-controller", "controller"),
        ("DaemonSet", "tether-agent", "agent"),
    ):
        assert not unknown_variables(set(env_of(container(one(kind, name)))), command), name


# What the downward API would put in the pods' fields (documentation addresses, never dialled).
FIELDS = {"status.podIP": "192.0.2.10", "spec.nodeName": "node-a"}
# What the Secrets the README has the operator create would hold.
SECRETS = {("tether-agent-token", "token"): "agents.0123456789abcdef"}


def pod_environment(workload: dict) -> dict[str, str]:
    """The environment Kubernetes gives the container: the ConfigMap, then its own env with
    downward-API fields filled in and $(VAR) references expanded, as the kubelet does."""
    c = container(workload)
    env: dict[str, str] = {}
    for source in c.get("envFrom", []):
        env.update(one("ConfigMap", source["configMapRef"]["name"])["data"])
    for e in c.get("env", []):
        if "valueFrom" in e:
            source = e["valueFrom"]
            if "secretKeyRef" in source:
                ref = source["secretKeyRef"]
                env[e["name"]] = SECRETS[ref["name"], ref["key"]]
            else:
                env[e["name"]] = FIELDS[source["fieldRef"]["fieldPath"]]
        else:
            env[e["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], e["value"])
    return env


def test_pods_build_their_configs():
    controller = one("Deployment", "tether-controller")
    agent = one("DaemonSet", "tether-agent")
    (ctl, agt) = configs_of(
        [(container(w)["args"], pod_environment(w)) for w in (controller, agent)]
    )
    assert "config" in ctl, ctl
    ctl = ctl["config"]
    assert ctl["etcd_endpoints"] == ["http://etcd.tether.svc:2379"]
    assert ctl["advertise"] == "192.0.2.10:7070"
    assert ctl["auth"] is True, "tokens required on the cluster network"
    assert "config" in agt, agt
    agt = agt["config"]
    assert agt["node"] == "node-a"
    assert agt["controller"] == "tether-controller.tether.svc:7070"
    assert agt["work_dir"] == "/var/lib/tether-agent"
    assert agt["leave_running"] is True
