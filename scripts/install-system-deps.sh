#!/usr/bin/env bash
# Installs the Debian packages the tests and benchmarks need, if they are missing.
# Nix (nix-bin) is real Nix for the Nix-format tests; casync is the dedup benchmark's baseline; curl is the
# attacker's HTTP client in tests/test_auth.py (run as user nobody, which cannot use the project's venv);
# systemd gives `systemd-analyze verify` for deploy/systemd (no running systemd needed).
# iproute2 (`ip netns`, veth) makes the network namespaces of the LAN-discovery and DNS tests;
# golang-go is the real Go that writes go.sum and builds from a prefetched GOPROXY tree.
# libsodium23 is the swarm key's XSalsa20 (net/pnet.py loads it with ctypes; PyNaCl's bundled copy hides it).
set -euo pipefail
want=(nix-bin casync curl iproute2 systemd golang-go libsodium23)
# cargo for the Cargo vendor test: Debian's, unless a rustup cargo is already there
command -v cargo >/dev/null 2>&1 || [ -x "$HOME/.cargo/bin/cargo" ] || want+=(cargo)
missing=()
for pkg in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ]; then SUDO=; else SUDO=sudo; fi
echo "installing system packages: ${missing[*]}" >&2
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
