#!/usr/bin/env python3
"""The validator catches what it claims to: each test breaks one thing in the rendered base
(or the TLS, router-wse or router-wse-tls overlay) and expects exactly that problem to be reported (and the
untouched renders to pass).

Run by deploy/validate.sh: RENDERED_BASE=<rendered base yaml> RENDERED_TLS=<rendered
overlays/tls yaml> RENDERED_ROUTER_WSE=<rendered overlays/router-wse yaml>
RENDERED_ROUTER_WSE_TLS=<rendered overlays/router-wse-tls yaml> SWITCHYARD_BIN=<binary>.
"""

from __future__ import annotations

import copy
import os
import sys
import unittest
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import validate  # noqa: E402

BASE = validate.load(Path(os.environ["RENDERED_BASE"]))
TLS = validate.load(Path(os.environ["RENDERED_TLS"]))
ROUTER_WSE = validate.load(Path(os.environ["RENDERED_ROUTER_WSE"]))
ROUTER_WSE_TLS = validate.load(Path(os.environ["RENDERED_ROUTER_WSE_TLS"]))
CLI = validate.Cli(os.environ["SWITCHYARD_BIN"])


def find(objects: list[dict], kind: str, name: str) -> dict:
    return next(o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name)


def container(objects: list[dict], kind: str, name: str, index: int = 0) -> dict:
    return validate.pod_spec(find(objects, kind, name))["containers"][index]


def env_entry(c: dict, name: str) -> dict:
    return next(e for e in c["env"] if e["name"] == name)


class ValidatorTest(unittest.TestCase):
    def problems(self, objects: list[dict]) -> list[str]:
        report = validate.Report()
        validate.check_objects(objects, "test", CLI, report)
        return report.problems

    def assert_problem(self, objects: list[dict], fragment: str) -> None:
        problems = self.problems(objects)
        self.assertTrue(any(fragment in p for p in problems), f"no {fragment!r} in {problems}")

    def broken(self) -> list[dict]:
        return copy.deepcopy(BASE)

    def test_base_passes(self) -> None:
        self.assertEqual(self.problems(self.broken()), [])

    def test_unknown_field_fails_the_schema(self) -> None:
        objects = self.broken()
        container(objects, "Deployment", "router")["livenessProbe"]["grpc"]["serviceName"] = "x"
        self.assert_problem(objects, "schema")

    def test_wrong_type_fails_the_schema(self) -> None:
        objects = self.broken()
        find(objects, "Deployment", "worker-gpu")["spec"]["replicas"] = "two"
        self.assert_problem(objects, "schema: spec/replicas")

    def test_unknown_switchyard_variable(self) -> None:
        objects = self.broken()
        container(objects, "Deployment", "router")["env"].append(
            {"name": "SWITCHYARD_WORKER_ID", "value": "x"}
        )
        self.assert_problem(objects, "`switchyard router` reads no variable SWITCHYARD_WORKER_ID")

    def test_unknown_flag(self) -> None:
        objects = self.broken()
        container(objects, "Deployment", "control-plane")["args"].append("--policy-file=/x")
        self.assert_problem(objects, "`switchyard control-plane` has no flag --policy-file")

    def test_unknown_subcommand(self) -> None:
        objects = self.broken()
        container(objects, "Deployment", "router")["args"] = ["route"]
        self.assert_problem(objects, "must run one of")

    def test_undefined_variable_reference(self) -> None:
        objects = self.broken()
        worker = container(objects, "Deployment", "worker-wse")
        env_entry(worker, "SWITCHYARD_ADVERTISE")["value"] = "$(POD_IPS):50061"
        self.assert_problem(objects, "uses $(POD_IPS), not defined before it")

    def test_advertise_must_be_the_pod_ip(self) -> None:
        objects = self.broken()
        worker = container(objects, "Deployment", "worker-gpu")
        env_entry(worker, "SWITCHYARD_ADVERTISE")["value"] = "$(POD_NAME):50061"
        self.assert_problem(objects, "built from the pod IP")

    def test_grace_period_must_cover_the_drain(self) -> None:
        objects = self.broken()
        validate.pod_spec(find(objects, "Deployment", "worker-gpu"))[
            "terminationGracePeriodSeconds"
        ] = 30
        self.assert_problem(objects, "does not cover the 60 s drain")

    def test_hardening(self) -> None:
        objects = self.broken()
        worker = validate.pod_spec(find(objects, "Deployment", "worker-gpu"))
        worker["initContainers"][0]["securityContext"]["readOnlyRootFilesystem"] = False
        self.assert_problem(objects, "container fetch-model: readOnlyRootFilesystem must be true")

    def test_service_must_select_pods(self) -> None:
        objects = self.broken()
        find(objects, "Service", "router")["spec"]["selector"]["app.kubernetes.io/component"] = "r"
        self.assert_problem(objects, "Service/router: selects no pod")

    def test_probe_port_must_exist(self) -> None:
        objects = self.broken()
        container(objects, "Deployment", "router")["readinessProbe"]["grpc"]["port"] = 50052
        self.assert_problem(objects, "readinessProbe port 50052 is not a container port")

    def test_missing_config_map_key(self) -> None:
        objects = self.broken()
        router = container(objects, "Deployment", "router")
        env_entry(router, "SWITCHYARD_ETCD")["valueFrom"]["configMapKeyRef"]["key"] = "etcd"
        self.assert_problem(objects, "has no key etcd")

    def test_etcd_members_match_replicas(self) -> None:
        objects = self.broken()
        find(objects, "StatefulSet", "etcd")["spec"]["replicas"] = 5
        self.assert_problem(objects, "ETCD_INITIAL_CLUSTER lists")

    def test_cuda_needs_a_gpu(self) -> None:
        objects = self.broken()
        worker = container(objects, "Deployment", "worker-gpu")
        env_entry(worker, "SWITCHYARD_DEVICE")["value"] = "cuda"
        self.assert_problem(objects, "needs the CUDA image and an nvidia.com/gpu limit")

    def test_model_volume_must_be_filled(self) -> None:
        objects = self.broken()
        validate.pod_spec(find(objects, "Deployment", "worker-gpu"))["initContainers"] = []
        self.assert_problem(objects, "no init container fetches the model")

    def test_router_grace_period_must_cover_pre_stop_and_drain(self) -> None:
        objects = self.broken()
        router = container(objects, "Deployment", "router")
        router["env"].append({"name": "SWITCHYARD_DRAIN_TIMEOUT", "value": "2m"})
        self.assert_problem(objects, "does not cover the 5 s preStop + the router's 120 s drain")

    def test_listen_port_must_be_declared(self) -> None:
        objects = self.broken()
        router = container(objects, "Deployment", "router")
        env_entry(router, "SWITCHYARD_HTTP_LISTEN")["value"] = "0.0.0.0:8081"
        self.assert_problem(objects, "SWITCHYARD_HTTP_LISTEN '0.0.0.0:8081' listens on no declared")

    def test_metrics_and_dashboard_ports_must_be_declared(self) -> None:
        objects = self.broken()
        worker = container(objects, "Deployment", "worker-gpu")
        env_entry(worker, "SWITCHYARD_METRICS_ADDR")["value"] = "0.0.0.0:9091"
        self.assert_problem(objects, "SWITCHYARD_METRICS_ADDR '0.0.0.0:9091' listens on no declared")

    def test_control_plane_dashboard_must_be_set(self) -> None:
        objects = self.broken()
        control_plane = container(objects, "Deployment", "control-plane")
        control_plane["env"].remove(env_entry(control_plane, "SWITCHYARD_HTTP_ADDR"))
        self.assert_problem(objects, "sets no SWITCHYARD_HTTP_ADDR: its default binds loopback")

    def test_listeners_must_be_on_the_pod_interfaces(self) -> None:
        objects = self.broken()
        control_plane = container(objects, "Deployment", "control-plane")
        env_entry(control_plane, "SWITCHYARD_HTTP_ADDR")["value"] = "127.0.0.1:8090"
        self.assert_problem(objects, "SWITCHYARD_HTTP_ADDR '127.0.0.1:8090' does not listen on the "
                                     "pod's interfaces")

    def test_pods_must_be_annotated_for_prometheus(self) -> None:
        objects = self.broken()
        template = find(objects, "Deployment", "worker-wse")["spec"]["template"]
        del template["metadata"]["annotations"]["prometheus.io/scrape"]
        self.assert_problem(objects, "Deployment/worker-wse container worker: the pod is not "
                                     "annotated prometheus.io/scrape")

    def test_prometheus_port_must_serve_metrics(self) -> None:
        objects = self.broken()
        # The control plane's dashboard port serves no /metrics.
        template = find(objects, "Deployment", "control-plane")["spec"]["template"]
        template["metadata"]["annotations"]["prometheus.io/port"] = "8090"
        self.assert_problem(objects, "prometheus.io/port '8090' is not where `switchyard "
                                     "control-plane` serves /metrics")
        # A router's HTTP port does.
        objects = self.broken()
        template = find(objects, "Deployment", "router")["spec"]["template"]
        template["metadata"]["annotations"]["prometheus.io/port"] = "50051"
        self.assert_problem(objects, "prometheus.io/port '50051' is not where `switchyard router`")

    def test_every_object_in_the_namespace(self) -> None:
        objects = self.broken()
        del find(objects, "Deployment", "control-plane")["metadata"]["namespace"]
        self.assert_problem(objects, "Deployment/control-plane: namespace None is not the rendered")


class TlsValidatorTest(unittest.TestCase):
    problems = ValidatorTest.problems
    assert_problem = ValidatorTest.assert_problem

    def broken(self) -> list[dict]:
        return copy.deepcopy(TLS)

    def test_tls_passes(self) -> None:
        self.assertEqual(self.problems(self.broken()), [])

    def test_worker_certificate_must_name_its_own_pool(self) -> None:
        objects = self.broken()
        volume = next(v for v in validate.pod_spec(find(objects, "Deployment", "worker-gpu"))["volumes"]
                      if v["name"] == "tls")
        volume["csi"]["volumeAttributes"]["csi.cert-manager.io/uri-sans"] = (
            "spiffe://switchyard/pool/wse/worker/${POD_NAME}"
        )
        self.assert_problem(objects, "container worker: the worker's certificate names")

    def test_worker_id_must_be_what_the_certificate_names(self) -> None:
        objects = self.broken()
        worker = container(objects, "Deployment", "worker-wse")
        env_entry(worker, "SWITCHYARD_WORKER_ID")["value"] = "wse-0"
        self.assert_problem(objects, "not the one it registers under")

    def test_control_plane_certificate_must_name_its_identity(self) -> None:
        objects = self.broken()
        del find(objects, "Certificate", "control-plane")["spec"]["uris"]
        self.assert_problem(objects, "does not name spiffe://switchyard/control-plane")

    def test_no_grpc_probe_against_tls(self) -> None:
        objects = self.broken()
        router = container(objects, "Deployment", "router")
        router["livenessProbe"] = {"grpc": {"port": 50051}}
        self.assert_problem(objects, "livenessProbe is a gRPC probe")

    def test_certificate_issuer_must_be_rendered(self) -> None:
        objects = self.broken()
        find(objects, "Certificate", "router")["spec"]["issuerRef"]["name"] = "letsencrypt"
        self.assert_problem(objects, "issuerRef Issuer/letsencrypt is not rendered")

    def test_csi_issuer_must_be_rendered(self) -> None:
        objects = self.broken()
        volume = next(v for v in validate.pod_spec(find(objects, "Deployment", "worker-wse"))["volumes"]
                      if v["name"] == "tls")
        volume["csi"]["volumeAttributes"]["csi.cert-manager.io/issuer-name"] = "other"
        self.assert_problem(objects, "issuer Issuer/other is not rendered")

    def test_unknown_cert_manager_field_fails_the_schema(self) -> None:
        objects = self.broken()
        find(objects, "Certificate", "etcd")["spec"]["dnsName"] = ["etcd-0.etcd"]
        self.assert_problem(objects, "cert-manager schema")

    def test_unknown_key_usage_fails_the_schema(self) -> None:
        objects = self.broken()
        find(objects, "Certificate", "router")["spec"]["usages"].append("server")
        self.assert_problem(objects, "cert-manager schema: spec/usages")

    def test_certificate_secret_counts_as_existing_only_when_written(self) -> None:
        objects = self.broken()
        find(objects, "Certificate", "router")["spec"]["secretName"] = "router-cert"
        self.assert_problem(objects, "Secret switchyard-router-tls does not exist")

    def test_etcd_clients_need_the_ca_and_a_certificate(self) -> None:
        objects = self.broken()
        router = container(objects, "Deployment", "router")
        router["env"] = [e for e in router["env"] if e["name"] != "SWITCHYARD_ETCD_CERT_FILE"]
        self.assert_problem(objects, "etcd serves TLS, but the container sets no "
                                     "SWITCHYARD_ETCD_CERT_FILE")

    def test_etcd_clients_must_use_https_against_a_tls_etcd(self) -> None:
        objects = self.broken()
        cm = next(o for o in objects if o["kind"] == "ConfigMap"
                  and "etcd-endpoints" in o.get("data", {}))
        cm["data"]["etcd-endpoints"] = cm["data"]["etcd-endpoints"].replace("https://", "http://")
        self.assert_problem(objects, "etcd-endpoints")



class RouterWseValidatorTest(unittest.TestCase):
    """overlays/router-wse: the base with components/router-wse."""

    problems = ValidatorTest.problems
    assert_problem = ValidatorTest.assert_problem

    def broken(self) -> list[dict]:
        return copy.deepcopy(ROUTER_WSE)

    def test_router_wse_passes(self) -> None:
        self.assertEqual(self.problems(self.broken()), [])

    def test_router_wse_is_a_known_subcommand(self) -> None:
        self.assertIn("--worker-advertise", CLI.accepted("router-wse")[0])
        objects = self.broken()
        container(objects, "Deployment", "router-wse")["args"].append("--lease-ttl=5s")
        self.assert_problem(objects, "`switchyard router-wse` has no flag --lease-ttl")

    def test_hosted_worker_must_advertise_the_pod_ip(self) -> None:
        objects = self.broken()
        router = container(objects, "Deployment", "router-wse")
        env_entry(router, "SWITCHYARD_WORKER_ADVERTISE")["value"] = "$(POD_NAME):50061"
        self.assert_problem(objects, "SWITCHYARD_WORKER_ADVERTISE must be built from the pod IP")

    def test_hosted_worker_must_advertise_its_listen_port(self) -> None:
        objects = self.broken()
        router = container(objects, "Deployment", "router-wse")
        env_entry(router, "SWITCHYARD_WORKER_ADVERTISE")["value"] = "$(POD_IP):50051"
        self.assert_problem(objects, "differs from the listen port")

    def test_hosted_worker_needs_its_listen_address(self) -> None:
        objects = self.broken()
        router = container(objects, "Deployment", "router-wse")
        router["env"] = [e for e in router["env"] if e["name"] != "SWITCHYARD_WORKER_LISTEN"]
        self.assert_problem(objects, "workers need SWITCHYARD_WORKER_LISTEN")

    def test_grace_period_must_cover_the_hosted_workers_drain(self) -> None:
        objects = self.broken()
        router = container(objects, "Deployment", "router-wse")
        env_entry(router, "SWITCHYARD_WORKER_DRAIN_TIMEOUT")["value"] = "40s"
        self.assert_problem(objects, "does not cover the 5 s preStop + the hosted worker's 40 s "
                                     "drain + 10 s")

    def test_worker_port_must_be_declared(self) -> None:
        objects = self.broken()
        router = container(objects, "Deployment", "router-wse")
        router["ports"] = [p for p in router["ports"] if p["containerPort"] != 50061]
        self.assert_problem(objects, "SWITCHYARD_WORKER_LISTEN '0.0.0.0:50061' listens on no")

    def test_router_service_must_select_the_router_wse_pods(self) -> None:
        objects = self.broken()
        find(objects, "Service", "router")["spec"]["selector"]["app.kubernetes.io/component"] = (
            "router"
        )
        self.assert_problem(objects, "Service/router: selects no pod")


class RouterWseTlsValidatorTest(unittest.TestCase):
    """overlays/router-wse-tls: the base with components/tls, router-wse and router-wse-tls."""

    problems = ValidatorTest.problems
    assert_problem = ValidatorTest.assert_problem

    def broken(self) -> list[dict]:
        return copy.deepcopy(ROUTER_WSE_TLS)

    def tls_attributes(self, objects: list[dict]) -> dict:
        volume = next(v for v in validate.pod_spec(find(objects, "Deployment", "router-wse"))[
            "volumes"] if v["name"] == "tls")
        return volume["csi"]["volumeAttributes"]

    def test_router_wse_tls_passes(self) -> None:
        self.assertEqual(self.problems(self.broken()), [])

    def test_without_router_wse_tls_router_wse_cannot_reach_etcd(self) -> None:
        # components/tls + components/router-wse alone: the router-wse pods get nothing.
        objects = self.broken()
        router = container(objects, "Deployment", "router-wse")
        router["env"] = [e for e in router["env"] if "TLS" not in e["name"]
                         and not e["name"].startswith("SWITCHYARD_ETCD_")]
        self.assert_problem(objects, "Deployment/router-wse container router-wse: etcd serves "
                                     "TLS, but the container sets no SWITCHYARD_ETCD_CA_FILE")

    def test_hosted_worker_certificate_must_name_its_identity(self) -> None:
        objects = self.broken()
        self.tls_attributes(objects)["csi.cert-manager.io/uri-sans"] = (
            "spiffe://switchyard/pool/gpu/worker/${POD_NAME}"
        )
        self.assert_problem(objects, "container router-wse: the worker's certificate names")

    def test_hosted_worker_must_take_only_cluster_client_certificates(self) -> None:
        objects = self.broken()
        router = container(objects, "Deployment", "router-wse")
        router["env"] = [e for e in router["env"]
                         if e["name"] != "SWITCHYARD_WORKER_TLS_CLIENT_CA_FILE"]
        self.assert_problem(objects, "sets no SWITCHYARD_WORKER_TLS_CLIENT_CA_FILE")

    def test_router_certificate_must_name_the_router_service(self) -> None:
        objects = self.broken()
        self.tls_attributes(objects)["csi.cert-manager.io/dns-names"] = "localhost"
        self.assert_problem(objects, "not Service router, which clients dial")

    def test_no_grpc_probe_against_router_wse_tls(self) -> None:
        objects = self.broken()
        router = container(objects, "Deployment", "router-wse")
        router["readinessProbe"] = {"grpc": {"port": 50051, "service": "switchyard.v1.Inference"}}
        self.assert_problem(objects, "readinessProbe is a gRPC probe")

    def test_etcd_client_certificate_is_needed(self) -> None:
        objects = self.broken()
        router = container(objects, "Deployment", "router-wse")
        router["env"] = [e for e in router["env"] if e["name"] != "SWITCHYARD_ETCD_CERT_FILE"]
        self.assert_problem(objects, "sets no SWITCHYARD_ETCD_CERT_FILE")

    def test_worker_client_ca_rule_covers_worker_gpu(self) -> None:
        objects = self.broken()
        worker = container(objects, "Deployment", "worker-gpu")
        worker["env"] = [e for e in worker["env"] if e["name"] != "SWITCHYARD_TLS_CLIENT_CA_FILE"]
        self.assert_problem(objects, "container worker: the worker serves TLS but sets no "
                                     "SWITCHYARD_TLS_CLIENT_CA_FILE")


if __name__ == "__main__":
    unittest.main(verbosity=1)
