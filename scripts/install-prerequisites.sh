#!/usr/bin/env bash
# Installs what the test suite needs beyond the .NET SDK, with Debian's packages: perf (linux-perf),
# which the tracing tests run on the perf.data files the engine writes; clang and zlib1g-dev, which
# NativeAOT links liboptpoline.so with; gcc, which builds the C sample host. Safe to run again; needs
# root for apt-get when something is missing.
set -euo pipefail
missing=()
if ! command -v perf >/dev/null 2>&1 || ! perf --version >/dev/null 2>&1; then missing+=(linux-perf); fi
command -v clang >/dev/null 2>&1 || missing+=(clang)
command -v gcc >/dev/null 2>&1 || missing+=(gcc)
dpkg -s zlib1g-dev >/dev/null 2>&1 || missing+=(zlib1g-dev)
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi
perf --version
clang --version | head -n 1
gcc --version | head -n 1
