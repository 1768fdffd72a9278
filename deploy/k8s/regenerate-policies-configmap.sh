#!/usr/bin/env bash
# Rewrites policies-configmap.yaml from ../../policies/*.toml (tests/test_deploy.py checks they match).
set -euo pipefail
cd "$(dirname "$0")"
{
  echo "# Generated from policies/ (tests/test_deploy.py fails if they differ). Edit policies/, then run"
  echo "# deploy/k8s/regenerate-policies-configmap.sh."
  printf 'apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: pixazo-proxy-policies\n  labels: {app.kubernetes.io/name: pixazo-proxy}\ndata:\n'
  for file in ../../policies/*.toml; do
    echo "  $(basename "$file"): |"
    sed 's/^\(.\)/    \1/' "$file"
  done
} > policies-configmap.yaml
