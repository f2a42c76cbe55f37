#!/usr/bin/env bash
# Builds the C peers of the Peers benchmark with gcc into OUT:
#   libpeers-O2.so         plain -O2: call *%rax
#   libpeers-retpoline.so  -O2 -mindirect-branch=thunk: every indirect call through a retpoline
#   libpeers-pgo.so        -O2 -mindirect-branch=thunk -fprofile-use after a training run on TABLES:
#                          gcc's indirect-call promotion, with retpolines for the calls it leaves indirect
# TABLES is the file the benchmark writes (see train.c); without it only the first two are built.
# gcc is installed with Debian's package where it is missing (needs root, as the project's other scripts).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:?usage: peers.sh OUT [TABLES]}
tables=${2:-}
if ! command -v gcc >/dev/null 2>&1; then
  echo "installing gcc" >&2
  apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc >&2
fi
mkdir -p "$out"
flags=(-O2 -fPIC -fcf-protection=none -fno-stack-protector -fno-ipa-icf)
gcc "${flags[@]}" -shared "$here/peers.c" -o "$out/libpeers-O2.so"
gcc "${flags[@]}" -mindirect-branch=thunk -shared "$here/peers.c" -o "$out/libpeers-retpoline.so"
if [ -n "$tables" ]; then
  pgo="$out/pgo"
  rm -rf "$pgo" && mkdir -p "$pgo"
  # The object keeps one path in both builds, so -fprofile-use finds the profile the training wrote.
  hardened=("${flags[@]}" -mindirect-branch=thunk)
  gcc "${hardened[@]}" -fprofile-generate -fprofile-update=single -c "$here/peers.c" -o "$pgo/peers.o"
  gcc "${flags[@]}" -c "$here/train.c" -o "$pgo/train.o"
  gcc -fprofile-generate "$pgo/peers.o" "$pgo/train.o" -o "$pgo/train"
  "$pgo/train" "$tables"
  gcc "${hardened[@]}" -fprofile-use -Wno-missing-profile -c "$here/peers.c" -o "$pgo/peers.o"
  gcc -shared "$pgo/peers.o" -o "$out/libpeers-pgo.so"
fi
