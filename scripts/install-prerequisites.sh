#!/usr/bin/env bash
# Installs what the test suite needs beyond the .NET SDK: perf (Debian's linux-perf), which the tracing
# tests run to read the perf.data files the engine writes. Safe to run again; needs root for apt-get.
set -euo pipefail
if ! command -v perf >/dev/null 2>&1 || ! perf --version >/dev/null 2>&1; then
  echo "installing linux-perf"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq linux-perf
fi
perf --version
