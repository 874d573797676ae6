#!/usr/bin/env bash
# Prints switchyard-alerts.yaml wrapped in a Prometheus Operator PrometheusRule (whose `spec` is
# a rule file), for clusters where the operator loads rules:
#
#   deploy/prometheus/prometheus-rule.sh [NAMESPACE] [LABEL=VALUE...] | kubectl apply -f -
#
# NAMESPACE defaults to `switchyard`; give the labels your Prometheus' ruleSelector matches
# (kube-prometheus-stack: release=<its release name>).
set -euo pipefail
namespace="${1:-switchyard}"
shift || true
echo "apiVersion: monitoring.coreos.com/v1"
echo "kind: PrometheusRule"
echo "metadata:"
echo "  name: switchyard-alerts"
echo "  namespace: ${namespace}"
echo "  labels:"
echo "    app.kubernetes.io/part-of: switchyard"
for label in "$@"; do
  echo "    ${label%%=*}: \"${label#*=}\""
done
echo "spec:"
grep -v '^#' "$(dirname "$0")/switchyard-alerts.yaml" | sed 's/^/  /'
