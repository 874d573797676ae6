#!/usr/bin/env python3
"""Checks rendered Kubernetes manifests (one multi-document YAML file per overlay).

1. Schema: every object against the Kubernetes OpenAPI schemas bundled in the PyPI package
   `kubernetes-validate`, strict (unknown fields are errors), for the oldest and the newest
   Kubernetes version the manifests support.
2. Switchyard's own rules, which the schemas cannot see: every `switchyard` container runs a
   real subcommand and uses only flags and SWITCHYARD_* variables that `switchyard <cmd> --help`
   lists; `$(VAR)` references resolve; ConfigMap/Secret references resolve; Services, PDBs,
   NetworkPolicies and the HPA select something; probes hit declared ports and every listen
   address (SWITCHYARD_*LISTEN, the control plane's dashboard SWITCHYARD_HTTP_ADDR, which must be
   set, and SWITCHYARD_METRICS_ADDR) is a declared port on the pod's interfaces; every
   Switchyard pod is annotated for Prometheus at a port where it serves /metrics; every
   container is hardened and has requests/limits; a worker
   (router-wse's hosted one too) advertises the pod IP on its listen port; the preStop sleep and
   the SIGTERM drains (router, worker, both for router-wse) fit in the grace period; every
   namespaced object is in the rendered Namespace; the etcd member list matches the StatefulSet;
   a CUDA worker asks for a GPU.
3. TLS (deploy/k8s/components/tls): cert-manager objects have no Kubernetes schema; they are
   checked against CERT_MANAGER_SCHEMA below instead, a strict subset of cert-manager's v1 API
   (the fields these manifests use; any other field is an error). Certificates and csi-driver
   volumes name a rendered Issuer; Secrets a Certificate writes count as existing; a worker's
   certificate names the identity it registers under
   (spiffe://switchyard/pool/<pool>/worker/<worker id>), the control plane's
   spiffe://switchyard/control-plane, a router's the Services selecting it; a worker serving TLS
   (router-wse's hosted one too) takes Worker calls only from client certificates of the CA; a
   component serving TLS has no gRPC probe (the kubelet's speak plaintext only); etcd URLs use
   https exactly when etcd serves TLS, and then every Switchyard container sets the etcd CA and
   client certificate.

Usage: validate.py --switchyard target/debug/switchyard RENDERED.yaml...
Exit status 1 with one line per problem when anything fails.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import functools

import jsonschema
import kubernetes_validate
import kubernetes_validate.utils

# kubernetes-validate re-reads the (multi-megabyte) schema definitions for every object it
# validates; they never change during a run, so read each file once.
kubernetes_validate.utils.schema_contents = functools.lru_cache(maxsize=None)(
    kubernetes_validate.utils.schema_contents
)


# Oldest: native `preStop.sleep` (beta, on by default) and gRPC probes (GA 1.27) need 1.30.
KUBERNETES_VERSIONS = ["1.30.0", "1.37.0"]
SUBCOMMANDS = {"router", "router-wse", "worker-gpu", "worker-wse", "control-plane"}
# Subcommands that run a router: on SIGTERM it drains (SWITCHYARD_DRAIN_TIMEOUT), then closes
# its links and stops its servers.
ROUTERS = {"router", "router-wse"}
# Subcommands that run (or host) a worker, by pool; the worker's listen address, advertised
# address, id and drain timeout variables. `router-wse` hosts a wafer-scale worker whose flags
# carry a `worker-` prefix (cli/src/components.rs, HostedWorkerArgs).
WORKER_POOLS = {"worker-gpu": "gpu", "worker-wse": "wse", "router-wse": "wse"}
_WORKER_SETTINGS = ("SWITCHYARD_LISTEN", "SWITCHYARD_ADVERTISE", "SWITCHYARD_WORKER_ID",
                    "SWITCHYARD_DRAIN_TIMEOUT")
WORKER_SETTINGS = {
    "worker-gpu": _WORKER_SETTINGS,
    "worker-wse": _WORKER_SETTINGS,
    "router-wse": ("SWITCHYARD_WORKER_LISTEN", "SWITCHYARD_WORKER_ADVERTISE",
                   "SWITCHYARD_WORKER_ID", "SWITCHYARD_WORKER_DRAIN_TIMEOUT"),
}
# With TLS, the variable that makes a (hosted) worker take Worker calls only from client
# certificates of the cluster CA (routers and control planes present theirs).
WORKER_CLIENT_CA = {
    "worker-gpu": "SWITCHYARD_TLS_CLIENT_CA_FILE",
    "worker-wse": "SWITCHYARD_TLS_CLIENT_CA_FILE",
    "router-wse": "SWITCHYARD_WORKER_TLS_CLIENT_CA_FILE",
}
# Objects without a namespace; every other object of a render shares one.
CLUSTER_SCOPED_KINDS = {"Namespace", "ClusterIssuer", "ClusterRole", "ClusterRoleBinding",
                        "PriorityClass", "StorageClass"}
# Secrets the operator creates (deploy/README.md); overlays may generate them instead.
OPERATOR_SECRETS = {
    "switchyard-api-keys",
    "switchyard-wse",
    "switchyard-admin-tokens",
    "switchyard-cluster-token",
}
# The API group of cert-manager's objects (Issuer, Certificate), which have no Kubernetes schema.
CERT_MANAGER_GROUP = "cert-manager.io"
CSI_DRIVER = "csi.cert-manager.io"
# The keys of a Secret cert-manager writes for a Certificate.
CERTIFICATE_SECRET_KEYS = {"tls.crt", "tls.key", "ca.crt"}
_ISSUER_REF = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "kind": {"enum": ["Issuer", "ClusterIssuer"]},
        "group": {"type": "string"},
    },
}
_KEY_USAGES = [
    "signing", "digital signature", "content commitment", "key encipherment", "key agreement",
    "data encipherment", "cert sign", "crl sign", "encipher only", "decipher only", "any",
    "server auth", "client auth", "code signing", "email protection", "s/mime",
    "ipsec end system", "ipsec tunnel", "ipsec user", "timestamping", "ocsp signing",
    "microsoft sgc", "netscape sgc",
]
_METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": {"type": "string"}, "namespace": {"type": "string"},
                   "labels": {"type": "object"}, "annotations": {"type": "object"}},
    "additionalProperties": False,
}
_STRINGS = {"type": "array", "items": {"type": "string", "minLength": 1}}
# A strict subset of cert-manager.io/v1 (https://cert-manager.io/docs/reference/api-docs/):
# the fields the manifests use, with their types and enums. Not the full CRD schema (the Issuer
# CRD alone is some 200 kB of ACME solver fields): a field outside the subset is an error here
# even where cert-manager would accept it; extend the subset, from the API reference, to use it.
CERT_MANAGER_SCHEMA = {
    "Issuer": {
        "type": "object",
        "additionalProperties": False,
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "cert-manager.io/v1"},
            "kind": {"const": "Issuer"},
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "minProperties": 1,
                "maxProperties": 1,
                "properties": {
                    "selfSigned": {"type": "object", "additionalProperties": False},
                    "ca": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["secretName"],
                        "properties": {"secretName": {"type": "string", "minLength": 1}},
                    },
                },
            },
        },
    },
    "Certificate": {
        "type": "object",
        "additionalProperties": False,
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "cert-manager.io/v1"},
            "kind": {"const": "Certificate"},
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "required": ["secretName", "issuerRef"],
                "properties": {
                    "secretName": {"type": "string", "minLength": 1},
                    "issuerRef": _ISSUER_REF,
                    "isCA": {"type": "boolean"},
                    "commonName": {"type": "string", "maxLength": 64},
                    "dnsNames": _STRINGS,
                    "uris": _STRINGS,
                    "ipAddresses": _STRINGS,
                    "usages": {"type": "array", "items": {"enum": _KEY_USAGES}},
                    "duration": {"type": "string", "pattern": r"^([0-9]+(\.[0-9]+)?(h|m|s))+$"},
                    "renewBefore": {"type": "string", "pattern": r"^([0-9]+(\.[0-9]+)?(h|m|s))+$"},
                    "privateKey": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "algorithm": {"enum": ["RSA", "ECDSA", "Ed25519"]},
                            "size": {"type": "integer"},
                            "encoding": {"enum": ["PKCS1", "PKCS8"]},
                            "rotationPolicy": {"enum": ["Never", "Always"]},
                        },
                    },
                },
            },
        },
    },
}
# The identities Switchyard's links check (cluster/src/identity.rs).
CONTROL_PLANE_IDENTITY = "spiffe://switchyard/control-plane"


def worker_identity(pool: str, worker_id: str) -> str:
    return f"spiffe://switchyard/pool/{pool}/worker/{worker_id}"


# Listen addresses besides the SWITCHYARD_*LISTEN ones: the control plane's dashboard and every
# component's Prometheus listener.
LISTEN_ADDRESS_VARIABLES = {"SWITCHYARD_HTTP_ADDR", "SWITCHYARD_METRICS_ADDR"}
# Listeners whose default binds loopback, where neither the Service nor the other pods reach
# them: the manifests must set them. (The control plane's dashboard: 127.0.0.1:8090.)
REQUIRED_LISTENERS = {"control-plane": ("SWITCHYARD_HTTP_ADDR",)}
# Where each subcommand serves Prometheus `/metrics`: SWITCHYARD_METRICS_ADDR's port, and a
# router's (router-wse's too) HTTP port.
METRICS_PORT_VARIABLES = {"router": ("SWITCHYARD_METRICS_ADDR", "SWITCHYARD_HTTP_LISTEN"),
                          "router-wse": ("SWITCHYARD_METRICS_ADDR", "SWITCHYARD_HTTP_LISTEN")}
UNSPECIFIED_HOSTS = {"0.0.0.0", "[::]"}
# Environment variables a switchyard container may set besides its own SWITCHYARD_* flags.
EXTRA_ENV = {"RUST_LOG", "OTEL_EXPORTER_OTLP_ENDPOINT"}
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}
VAR_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


class Report:
    def __init__(self) -> None:
        self.problems: list[str] = []

    def error(self, where: str, message: str) -> None:
        self.problems.append(f"{where}: {message}")


def name_of(obj: dict) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


def pod_spec(obj: dict) -> dict | None:
    if obj["kind"] in WORKLOAD_KINDS:
        return obj["spec"]["template"]["spec"]
    return None


def pod_labels(obj: dict) -> dict:
    return obj["spec"]["template"]["metadata"].get("labels", {})


def selector_matches(selector: dict, labels: dict) -> bool:
    """A LabelSelector (matchLabels + matchExpressions) against a label set."""
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def parse_seconds(text: str) -> float:
    """The humantime durations the manifests use: 500ms, 30s, 2m, 1h."""
    match = re.fullmatch(r"(\d+)(ms|s|m|h)", text.strip())
    if not match:
        raise ValueError(f"unsupported duration {text!r}")
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[match.group(2)]
    return int(match.group(1)) * scale


class Cli:
    """Flags and environment variables each `switchyard` subcommand accepts (from --help)."""

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.cache: dict[str, tuple[set[str], set[str]]] = {}
        self.defaults_cache: dict[str, dict[str, str]] = {}

    def defaults(self, subcommand: str) -> dict[str, str]:
        """The default of each variable that has one, as `--help` shows it (e.g. "30s")."""
        self.accepted(subcommand)
        return self.defaults_cache[subcommand]

    def accepted(self, subcommand: str) -> tuple[set[str], set[str]]:
        if subcommand not in self.cache:
            out = subprocess.run(
                [self.binary, subcommand, "--help"],
                check=True,
                capture_output=True,
                text=True,
                # A SWITCHYARD_* variable in this environment would only change the defaults shown.
                env={"PATH": "/usr/bin:/bin"},
            ).stdout
            flags = set(re.findall(r"^\s+(?:-\w, )?(--[a-z0-9][a-z0-9-]*)", out, re.M))
            env = set(re.findall(r"\[env: ([A-Z0-9_]+)=", out))
            if not flags or not env:
                raise RuntimeError(f"could not read `{subcommand} --help`:\n{out}")
            self.cache[subcommand] = (flags, env)
            self.defaults_cache[subcommand] = dict(
                re.findall(r"\[env: ([A-Z0-9_]+)=[^\]]*\]\s*\[default: ([^\]]*)\]", out)
            )
        return self.cache[subcommand]


@functools.lru_cache(maxsize=None)
def schema_problems(document: str) -> tuple[str, ...]:
    """Schema errors of one object (as canonical JSON: overlays and tests repeat objects)."""
    obj = json.loads(document)
    problems = []
    if obj.get("apiVersion", "").split("/")[0] == CERT_MANAGER_GROUP:
        schema = CERT_MANAGER_SCHEMA.get(obj["kind"])
        if schema is None:
            return (f"cert-manager {obj['kind']}: not in the checked subset (CERT_MANAGER_SCHEMA)",)
        for error in jsonschema.Draft7Validator(schema).iter_errors(obj):
            path = "/".join(str(p) for p in error.path)
            problems.append(f"cert-manager schema: {path}: {error.message}")
        return tuple(problems)
    for version in KUBERNETES_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            path = "/".join(str(p) for p in error.path)
            problems.append(f"k8s {version} schema: {path}: {error.message}")
        except kubernetes_validate.SchemaNotFoundError as error:
            problems.append(f"k8s {version}: no schema: {error.message}")
    return tuple(problems)


def check_schema(objects: list[dict], where: str, report: Report) -> None:
    for obj in objects:
        for problem in schema_problems(json.dumps(obj, sort_keys=True)):
            report.error(f"{where} {name_of(obj)}", problem)


def container_env(container: dict, where: str, report: Report) -> dict[str, dict]:
    """Env entries by name, checking each $(VAR) refers to a variable defined before it."""
    defined: dict[str, dict] = {}
    for entry in container.get("env", []):
        for ref in VAR_REF.findall(entry.get("value", "")):
            if ref not in defined:
                report.error(where, f"env {entry['name']} uses $({ref}), not defined before it")
        defined[entry["name"]] = entry
    for field in ("command", "args"):
        for arg in container.get(field, []):
            for ref in VAR_REF.findall(arg):
                if ref not in defined:
                    report.error(where, f"{field} uses $({ref}), not a variable of the container")
    return defined


def check_hardening(obj: dict, spec: dict, where: str, report: Report) -> None:
    pod_sc = spec.get("securityContext", {})
    if pod_sc.get("runAsNonRoot") is not True:
        report.error(where, "pod securityContext.runAsNonRoot must be true")
    if pod_sc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        report.error(where, "pod securityContext.seccompProfile must be RuntimeDefault")
    if spec.get("automountServiceAccountToken") is not False:
        report.error(where, "automountServiceAccountToken must be false (no component uses the API)")
    for container in spec.get("initContainers", []) + spec["containers"]:
        cwhere = f"{where} container {container['name']}"
        sc = container.get("securityContext", {})
        if sc.get("allowPrivilegeEscalation") is not False:
            report.error(cwhere, "allowPrivilegeEscalation must be false")
        if sc.get("readOnlyRootFilesystem") is not True:
            report.error(cwhere, "readOnlyRootFilesystem must be true")
        if "ALL" not in sc.get("capabilities", {}).get("drop", []):
            report.error(cwhere, "capabilities.drop must include ALL")
        resources = container.get("resources", {})
        for kind in ("cpu", "memory"):
            if kind not in resources.get("requests", {}):
                report.error(cwhere, f"resources.requests.{kind} missing")
        if "memory" not in resources.get("limits", {}):
            report.error(cwhere, "resources.limits.memory missing")


def check_probes(container: dict, where: str, report: Report) -> None:
    ports = {p["containerPort"] for p in container.get("ports", [])}
    names = {p["name"] for p in container.get("ports", []) if "name" in p}
    for probe_name in ("startupProbe", "livenessProbe", "readinessProbe"):
        probe = container.get(probe_name)
        if not probe:
            continue
        for action in ("grpc", "httpGet", "tcpSocket"):
            if action in probe:
                port = probe[action]["port"]
                if port not in ports and port not in names:
                    report.error(where, f"{probe_name} port {port} is not a container port")
    if container.get("ports") and "readinessProbe" not in container:
        report.error(where, "serves ports but has no readinessProbe")


def check_switchyard(container: dict, spec: dict, env: dict[str, dict], cli: Cli, where: str,
                     report: Report) -> None:
    args = container.get("args", [])
    if container.get("command") or not args or args[0] not in SUBCOMMANDS:
        report.error(where, f"must run one of {sorted(SUBCOMMANDS)} as args[0], got {args[:1]}")
        return
    subcommand = args[0]
    flags, env_names = cli.accepted(subcommand)
    for arg in args[1:]:
        if arg.startswith("--") and arg.split("=", 1)[0] not in flags:
            report.error(where, f"`switchyard {subcommand}` has no flag {arg.split('=', 1)[0]}")
    referenced = {ref for e in env.values() for ref in VAR_REF.findall(e.get("value", ""))}
    for name in env:
        if name.startswith("SWITCHYARD_"):
            if name not in env_names:
                report.error(where, f"`switchyard {subcommand}` reads no variable {name}")
        elif name not in EXTRA_ENV and name not in referenced:
            report.error(where, f"env {name} is neither a switchyard setting nor used by one")
    check_listen_ports(container, env, subcommand, where, report)
    check_drain(container, spec, env, subcommand, cli, where, report)
    if subcommand in WORKER_SETTINGS:
        listen_var, advertise_var, id_var, _ = WORKER_SETTINGS[subcommand]
        for required in (advertise_var, listen_var, id_var):
            if required not in env:
                report.error(where, f"workers need {required} (routers dial the advertised address)")
        advertise = env.get(advertise_var, {}).get("value", "")
        listen = env.get(listen_var, {}).get("value", "")
        if advertise.rsplit(":", 1)[-1] != listen.rsplit(":", 1)[-1]:
            report.error(where, f"advertised port ({advertise}) differs from the listen port ({listen})")
        pod_ip = env.get(VAR_REF.findall(advertise)[0], {}) if VAR_REF.search(advertise) else {}
        if pod_ip.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") != "status.podIP":
            report.error(where, f"{advertise_var} must be built from the pod IP (downward API)")
    if subcommand == "worker-gpu":
        device = env.get("SWITCHYARD_DEVICE", {}).get("value")
        gpus = container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")
        if device == "cuda" and (not gpus or "cuda" not in container["image"]):
            report.error(where, "SWITCHYARD_DEVICE=cuda needs the CUDA image and an nvidia.com/gpu limit")
        if gpus and device != "cuda":
            report.error(where, "has an nvidia.com/gpu limit but does not run on cuda")
        check_model_volume(container, spec, env, where, report)


def is_listen_variable(name: str) -> bool:
    return (name.startswith("SWITCHYARD_") and name.endswith("LISTEN")) \
        or name in LISTEN_ADDRESS_VARIABLES


def check_listen_ports(container: dict, env: dict[str, dict], subcommand: str, where: str,
                       report: Report) -> None:
    """Every address the process listens on is a declared container port on the pod's
    interfaces: Services, probes and NetworkPolicies name the declared ports, the process binds
    the configured ones, and a loopback address would be reachable from the pod alone."""
    declared = {p["containerPort"] for p in container.get("ports", [])}
    for required in REQUIRED_LISTENERS.get(subcommand, ()):
        if required not in env:
            report.error(where, f"sets no {required}: its default binds loopback, which only the "
                                f"pod itself reaches")
    for name, entry in env.items():
        if not is_listen_variable(name):
            continue
        host, _, port = entry.get("value", "").rpartition(":")
        if not port.isdigit() or int(port) not in declared:
            report.error(where, f"{name} {entry.get('value')!r} listens on no declared containerPort "
                                f"({sorted(declared)})")
        if host not in UNSPECIFIED_HOSTS:
            report.error(where, f"{name} {entry.get('value')!r} does not listen on the pod's "
                                f"interfaces (0.0.0.0 or [::])")


def check_metrics(obj: dict, env: dict[str, dict], subcommand: str, where: str,
                  report: Report) -> None:
    """Every Switchyard pod is annotated for Prometheus (prometheus.io/scrape, port, path) at a
    port where its process serves `/metrics`."""
    if subcommand not in SUBCOMMANDS:
        return
    annotations = obj["spec"]["template"]["metadata"].get("annotations", {})
    if annotations.get("prometheus.io/scrape") != "true":
        report.error(where, "the pod is not annotated prometheus.io/scrape: \"true\"")
        return
    served = {
        env[name].get("value", "").rsplit(":", 1)[-1]
        for name in METRICS_PORT_VARIABLES.get(subcommand, ("SWITCHYARD_METRICS_ADDR",))
        if name in env
    }
    port = annotations.get("prometheus.io/port")
    if port not in served:
        report.error(where, f"prometheus.io/port {port!r} is not where `switchyard {subcommand}` "
                            f"serves /metrics (ports {sorted(served) or 'none'}: "
                            f"SWITCHYARD_METRICS_ADDR, or a router's HTTP port)")
    if annotations.get("prometheus.io/path") != "/metrics":
        report.error(where, f"prometheus.io/path {annotations.get('prometheus.io/path')!r} is not "
                            f"/metrics")


def check_drain(container: dict, spec: dict, env: dict[str, dict], subcommand: str, cli: Cli,
                where: str, report: Report) -> None:
    """The grace period covers the preStop sleep, then the SIGTERM drains: a router's (then its
    links close and its servers stop, 5 s) and a worker's (then its lease is revoked and its
    servers stop, 10 s). router-wse runs both side by side."""
    grace = spec.get("terminationGracePeriodSeconds", 30)
    pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    defaults = cli.defaults(subcommand)

    def drain_of(variable: str) -> float:
        return parse_seconds(env.get(variable, {}).get("value") or defaults.get(variable, "30s"))

    needs = []
    if subcommand in ROUTERS:
        needs.append((drain_of("SWITCHYARD_DRAIN_TIMEOUT"), 5, "router's "))
    if subcommand in WORKER_SETTINGS:
        needs.append((drain_of(WORKER_SETTINGS[subcommand][3]), 10, "" if subcommand not in ROUTERS
                      else "hosted worker's "))
    for drain, stop, whose in needs:
        if grace < pre_stop + drain + stop:
            before = f"the {pre_stop:g} s preStop + " if pre_stop else ""
            report.error(where, f"terminationGracePeriodSeconds {grace} does not cover {before}the "
                                f"{whose}{drain:g} s drain + {stop} s")


def check_model_volume(container: dict, spec: dict, env: dict[str, dict], where: str,
                       report: Report) -> None:
    """The candle engine's model file lies on a volume the fetch init container fills."""
    if env.get("SWITCHYARD_ENGINE", {}).get("value") != "candle":
        return
    model_dir = str(Path(env.get("SWITCHYARD_MODEL_PATH", {}).get("value", "models/x")).parent)
    mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
    volume = mounts.get(model_dir)
    if volume is None:
        report.error(where, f"the model directory {model_dir} is not a volume mount")
        return
    for init in spec.get("initContainers", []):
        init_env = {e["name"]: e.get("value") for e in init.get("env", [])}
        init_mounts = {m["name"]: m["mountPath"] for m in init.get("volumeMounts", [])}
        if init_env.get("SWITCHYARD_MODEL_DIR") and volume in init_mounts:
            if init_mounts[volume] != init_env["SWITCHYARD_MODEL_DIR"]:
                report.error(where, "the model init container writes outside the model volume")
            return
    report.error(where, f"no init container fetches the model into volume {volume}")


def check_references(obj: dict, objects: list[dict], where: str, report: Report) -> None:
    spec = pod_spec(obj)
    config_maps = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ConfigMap"}
    secrets = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Secret"}
    # The Secret a Certificate names is written by cert-manager once it is issued.
    for cert in certificates(objects):
        secrets.setdefault(cert["spec"]["secretName"],
                           {"data": dict.fromkeys(CERTIFICATE_SECRET_KEYS, "")})

    def check(kind: str, name: str, key: str | None, optional: bool) -> None:
        pool = config_maps if kind == "ConfigMap" else secrets
        if name not in pool:
            if kind == "Secret" and name in OPERATOR_SECRETS:
                return
            report.error(where, f"{kind} {name} does not exist")
            return
        data = {**pool[name].get("data", {}), **pool[name].get("stringData", {})}
        if key is not None and key not in data and not optional:
            report.error(where, f"{kind} {name} has no key {key}")

    for container in spec.get("initContainers", []) + spec["containers"]:
        for entry in container.get("env", []):
            source = entry.get("valueFrom", {})
            for ref_kind, kind in (("configMapKeyRef", "ConfigMap"), ("secretKeyRef", "Secret")):
                if ref_kind in source:
                    ref = source[ref_kind]
                    check(kind, ref["name"], ref["key"], ref.get("optional", False))
        mounted = {m["name"] for m in container.get("volumeMounts", [])}
        declared = {v["name"] for v in spec.get("volumes", [])} | {
            claim["metadata"]["name"] for claim in obj["spec"].get("volumeClaimTemplates", [])
        }
        for missing in mounted - declared:
            report.error(where, f"container {container['name']} mounts undeclared volume {missing}")
    for volume in spec.get("volumes", []):
        if "configMap" in volume:
            for item in volume["configMap"].get("items", [{"key": None}]):
                check("ConfigMap", volume["configMap"]["name"], item["key"], False)
        if "secret" in volume:
            for item in volume["secret"].get("items", [{"key": None}]):
                check("Secret", volume["secret"]["secretName"], item["key"], False)


def certificates(objects: list[dict]) -> list[dict]:
    return [o for o in objects
            if o["kind"] == "Certificate" and o.get("apiVersion", "").startswith(CERT_MANAGER_GROUP)]


def issuers(objects: list[dict]) -> set[tuple[str, str]]:
    return {(o["kind"], o["metadata"]["name"]) for o in objects
            if o["kind"] in ("Issuer", "ClusterIssuer")
            and o.get("apiVersion", "").startswith(CERT_MANAGER_GROUP)}


def check_cert_manager(objects: list[dict], where: str, report: Report) -> None:
    """Certificates name a rendered issuer; a CA issuer's Secret is a Certificate's."""
    known = issuers(objects)
    written = {c["spec"]["secretName"] for c in certificates(objects)}
    for cert in certificates(objects):
        ref = cert["spec"].get("issuerRef", {})
        if (ref.get("kind", "Issuer"), ref.get("name")) not in known:
            report.error(f"{where} {name_of(cert)}", f"issuerRef {ref.get('kind', 'Issuer')}/"
                                                     f"{ref.get('name')} is not rendered")
    for obj in objects:
        if obj["kind"] == "Issuer" and "ca" in obj.get("spec", {}):
            secret = obj["spec"]["ca"].get("secretName")
            if secret not in written:
                report.error(f"{where} {name_of(obj)}", f"CA Secret {secret} is no Certificate's")


def tls_file_source(container: dict, spec: dict, path: str, objects: list[dict]) -> dict | None:
    """Where the file at `path` comes from: {"csi": attributes} or {"certificate": object}."""
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        if not path.startswith(mount["mountPath"].rstrip("/") + "/"):
            continue
        volume = volumes.get(mount["name"], {})
        if volume.get("csi", {}).get("driver") == CSI_DRIVER:
            return {"csi": volume["csi"].get("volumeAttributes", {})}
        if "secret" in volume:
            for cert in certificates(objects):
                if cert["spec"]["secretName"] == volume["secret"]["secretName"]:
                    return {"certificate": cert}
    return None


def certificate_names(source: dict | None, field: str) -> list[str]:
    """The DNS names (field "dns") or URI SANs ("uri") a certificate source names."""
    if source and "csi" in source:
        attribute = {"dns": "csi.cert-manager.io/dns-names", "uri": "csi.cert-manager.io/uri-sans"}
        return [n.strip() for n in source["csi"].get(attribute[field], "").split(",") if n.strip()]
    if source and "certificate" in source:
        return source["certificate"]["spec"].get({"dns": "dnsNames", "uri": "uris"}[field], [])
    return []


def check_tls(container: dict, spec: dict, env: dict[str, dict], objects: list[dict], where: str,
              report: Report, labels: dict | None = None) -> None:
    """A component serving TLS: no gRPC probes, and its certificate names its identity (a
    router's: the Services that send clients to it; a worker's, router-wse's hosted one too: the
    worker it registers as); a worker takes Worker calls only from client certificates."""
    cert_file = env.get("SWITCHYARD_TLS_CERT_FILE", {}).get("value")
    if cert_file is None:
        return
    for probe_name in ("startupProbe", "livenessProbe", "readinessProbe"):
        if "grpc" in container.get(probe_name, {}):
            report.error(where, f"{probe_name} is a gRPC probe, which speaks plaintext only: "
                                f"it fails against a TLS listener")
    source = tls_file_source(container, spec, cert_file, objects)
    subcommand = container.get("args", [""])[0]
    for volume in spec.get("volumes", []):
        csi = volume.get("csi", {})
        if csi.get("driver") == CSI_DRIVER:
            issuer = csi.get("volumeAttributes", {}).get("csi.cert-manager.io/issuer-name")
            kind = csi.get("volumeAttributes", {}).get("csi.cert-manager.io/issuer-kind", "Issuer")
            if (kind, issuer) not in issuers(objects):
                report.error(where, f"csi volume {volume['name']}: issuer {kind}/{issuer} is not rendered")
    if subcommand in WORKER_POOLS:
        pool = WORKER_POOLS[subcommand]
        worker_id = env.get("SWITCHYARD_WORKER_ID", {}).get("value", "")
        refs = VAR_REF.findall(worker_id)
        pod_name = (len(refs) == 1 and worker_id == f"$({refs[0]})"
                    and env.get(refs[0], {}).get("valueFrom", {}).get("fieldRef", {})
                    .get("fieldPath") == "metadata.name")
        uris = certificate_names(source, "uri")
        # csi-driver expands ${POD_NAME} to the pod's name, which the worker registers under.
        expected = worker_identity(pool, "${POD_NAME}") if pod_name else None
        if expected is None or expected not in uris:
            report.error(where, f"the worker's certificate names {uris or 'no identity'}, not the "
                                f"one it registers under ({worker_identity(pool, '<worker id>')}"
                                f" with SWITCHYARD_WORKER_ID the pod name and the certificate "
                                f"from a {CSI_DRIVER} volume with uri-sans "
                                f"{worker_identity(pool, '${POD_NAME}')}): routers refuse it")
        client_ca = WORKER_CLIENT_CA[subcommand]
        if client_ca not in env:
            report.error(where, f"the worker serves TLS but sets no {client_ca}: its Worker calls "
                                f"would take any client, not only the cluster's certificates")
    if subcommand in ROUTERS:
        # Clients dial the router by the names of the Services selecting its pods.
        dns = certificate_names(source, "dns")
        for service in objects:
            selector = service["spec"].get("selector") if service["kind"] == "Service" else None
            if not selector or not selector_matches({"matchLabels": selector}, labels or {}):
                continue
            if service["metadata"]["name"] not in dns:
                report.error(where, f"the router's certificate names {dns or 'no DNS name'}, not "
                                    f"Service {service['metadata']['name']}, which clients dial")
    if subcommand == "control-plane":
        uris = source["certificate"]["spec"].get("uris", []) if source and "certificate" in source else []
        if CONTROL_PLANE_IDENTITY not in uris:
            report.error(where, f"the control plane's certificate does not name "
                                f"{CONTROL_PLANE_IDENTITY}: routers refuse it")


def check_selectors(objects: list[dict], where: str, report: Report) -> None:
    workloads = [o for o in objects if o["kind"] in WORKLOAD_KINDS]
    by_name = {(o["kind"], o["metadata"]["name"]): o for o in objects}

    def selected(selector: dict) -> list[dict]:
        return [w for w in workloads if selector_matches(selector, pod_labels(w))]

    for obj in objects:
        owhere = f"{where} {name_of(obj)}"
        kind = obj["kind"]
        if kind == "Service":
            targets = selected({"matchLabels": obj["spec"]["selector"]})
            if not targets:
                report.error(owhere, "selects no pod")
            for port in obj["spec"]["ports"]:
                target = port.get("targetPort", port["port"])
                for workload in targets:
                    declared = {
                        value
                        for c in pod_spec(workload)["containers"]
                        for p in c.get("ports", [])
                        for value in (p["containerPort"], p.get("name"))
                    }
                    if target not in declared:
                        report.error(owhere, f"targetPort {target} is not a port of {name_of(workload)}")
        elif kind == "PodDisruptionBudget":
            if not selected(obj["spec"]["selector"]):
                report.error(owhere, "selects no pod")
        elif kind == "NetworkPolicy":
            pod_selector = obj["spec"]["podSelector"]
            if pod_selector and not selected(pod_selector):
                report.error(owhere, "selects no pod")
            for rule in obj["spec"].get("ingress", []) + obj["spec"].get("egress", []):
                for peer in rule.get("from", []) + rule.get("to", []):
                    if peer.get("podSelector") and "namespaceSelector" not in peer:
                        if not selected(peer["podSelector"]):
                            report.error(owhere, f"peer {peer['podSelector']} selects no pod")
        elif kind == "HorizontalPodAutoscaler":
            target = obj["spec"]["scaleTargetRef"]
            scaled = by_name.get((target["kind"], target["name"]))
            if scaled is None:
                report.error(owhere, f"scales missing {target['kind']}/{target['name']}")
            elif "replicas" in scaled["spec"]:
                report.error(owhere, f"{name_of(scaled)} sets replicas, which fights the HPA")
        elif kind == "StatefulSet":
            headless = by_name.get(("Service", obj["spec"]["serviceName"]))
            if headless is None or headless["spec"].get("clusterIP") != "None":
                report.error(owhere, f"serviceName {obj['spec']['serviceName']} is not a headless Service")


def check_etcd(objects: list[dict], where: str, report: Report) -> None:
    """The initial member list, the StatefulSet size and the endpoints clients use agree."""
    for obj in objects:
        if obj["kind"] != "StatefulSet" or obj["metadata"]["name"] != "etcd":
            continue
        replicas = obj["spec"].get("replicas", 1)
        service = obj["spec"]["serviceName"]
        expected = [f"etcd-{i}" for i in range(replicas)]
        env = {e["name"]: e.get("value", "") for e in pod_spec(obj)["containers"][0]["env"]}
        peer_scheme = "https" if env.get("ETCD_PEER_CERT_FILE") else "http"
        client_scheme = "https" if env.get("ETCD_CERT_FILE") else "http"
        members = [m.split("=", 1) for m in env["ETCD_INITIAL_CLUSTER"].split(",")]
        if [name for name, _ in members] != expected:
            report.error(f"{where} {name_of(obj)}", f"ETCD_INITIAL_CLUSTER lists {members}, "
                                                    f"replicas are {expected}")
        for name, url in members:
            if url != f"{peer_scheme}://{name}.{service}:2380":
                report.error(f"{where} {name_of(obj)}", f"peer URL {url} is not "
                                                        f"{peer_scheme}://{name}.{service}:2380")
        for key, scheme in (("ETCD_LISTEN_CLIENT_URLS", client_scheme),
                            ("ETCD_ADVERTISE_CLIENT_URLS", client_scheme),
                            ("ETCD_LISTEN_PEER_URLS", peer_scheme),
                            ("ETCD_INITIAL_ADVERTISE_PEER_URLS", peer_scheme)):
            if key in env and not env[key].startswith(f"{scheme}://"):
                report.error(f"{where} {name_of(obj)}", f"{key} {env[key]} is not {scheme}://")
        clients = [f"{client_scheme}://{name}.{service}:2379" for name in expected]
        for cm in objects:
            if cm["kind"] == "ConfigMap" and "etcd-endpoints" in cm.get("data", {}):
                listed = cm["data"]["etcd-endpoints"].split(",")
                if listed != clients:
                    report.error(f"{where} {name_of(cm)}", f"etcd-endpoints {listed} != members {clients}")
        if client_scheme != "https":
            continue
        # Against a TLS etcd every Switchyard container needs the CA, and the client
        # certificate when etcd asks for one: a component added without them (a component
        # applied after components/tls, say) cannot reach the registry.
        needed = {"SWITCHYARD_ETCD_CA_FILE"}
        if env.get("ETCD_CLIENT_CERT_AUTH") == "true":
            needed.add("SWITCHYARD_ETCD_CERT_FILE")
        for workload in objects:
            spec = pod_spec(workload)
            for container in spec["containers"] if spec else []:
                names = {e["name"] for e in container.get("env", [])}
                if "SWITCHYARD_ETCD" in names and not needed <= names:
                    report.error(f"{where} {name_of(workload)} container {container['name']}",
                                 f"etcd serves TLS, but the container sets no "
                                 f"{' / '.join(sorted(needed - names))}")


def check_namespace(objects: list[dict], where: str, report: Report) -> None:
    """Every namespaced object lands in the rendered Namespace. An object a kustomize component
    adds gets no namespace from the base it builds on (the overlay must set `namespace:`), and
    `kubectl apply -k` would put it in the context's default namespace, away from the rest."""
    rendered = [o["metadata"]["name"] for o in objects if o["kind"] == "Namespace"]
    expected = rendered[0] if len(rendered) == 1 else None
    for obj in objects:
        if obj["kind"] in CLUSTER_SCOPED_KINDS:
            continue
        namespace = obj["metadata"].get("namespace")
        if namespace is None or (expected is not None and namespace != expected):
            report.error(f"{where} {name_of(obj)}", f"namespace {namespace!r} is not the rendered "
                                                    f"Namespace {expected!r}")


def check_objects(objects: list[dict], where: str, cli: Cli, report: Report) -> None:
    """Every check, on the objects of one rendered overlay."""
    check_schema(objects, where, report)
    for obj in objects:
        if obj["kind"] == "ConfigMap" and obj["metadata"]["name"].startswith("switchyard-policy"):
            for key, value in obj.get("data", {}).items():
                try:
                    json.loads(value)
                except json.JSONDecodeError as error:
                    report.error(f"{where} {name_of(obj)}", f"{key} is not JSON: {error}")
        spec = pod_spec(obj)
        if spec is None:
            continue
        owhere = f"{where} {name_of(obj)}"
        check_hardening(obj, spec, owhere, report)
        check_references(obj, objects, owhere, report)
        for container in spec.get("initContainers", []) + spec["containers"]:
            cwhere = f"{owhere} container {container['name']}"
            env = container_env(container, cwhere, report)
            check_probes(container, cwhere, report)
            image = container["image"].rsplit("/", 1)[-1].split(":", 1)[0]
            if image in ("switchyard", "switchyard-cuda"):
                check_switchyard(container, spec, env, cli, cwhere, report)
                check_metrics(obj, env, (container.get("args") or [""])[0], cwhere, report)
                check_tls(container, spec, env, objects, cwhere, report, pod_labels(obj))
    check_cert_manager(objects, where, report)
    check_selectors(objects, where, report)
    check_etcd(objects, where, report)
    check_namespace(objects, where, report)


def load(path: Path) -> list[dict]:
    # kubernetes-validate's own loader (it copes with PyYAML's "=" scalar quirk).
    return kubernetes_validate.utils.resources_from_file(str(path))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--switchyard", required=True, help="the built switchyard binary")
    parser.add_argument("rendered", nargs="+", type=Path)
    args = parser.parse_args()
    cli = Cli(args.switchyard)
    report = Report()
    for path in args.rendered:
        objects = load(path)
        check_objects(objects, path.stem, cli, report)
        print(f"{path.stem}: {len(objects)} objects checked against Kubernetes "
              f"{' and '.join(KUBERNETES_VERSIONS)} schemas and Switchyard's rules")
    for problem in report.problems:
        print(f"error: {problem}", file=sys.stderr)
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
