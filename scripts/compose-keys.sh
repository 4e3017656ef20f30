#!/bin/sh
# Key pairs for the compose lab (compose.keys.yaml): one per node service and one for
# a client on the host, in ./keys/compose (or $1). Existing pairs are kept.
#
# The containers run as uid 10001, so the lab's secret certificates are made readable
# by it (mode 0644 here, lab only). In a real deployment keep each .key_secret 0600,
# owned by the node's user, on its own host.
set -eu
cd "$(dirname "$0")/.."
DIR=${1:-keys/compose}
ZMESH=${ZMESH:-.venv/bin/zmesh}
for name in node-a node-b node-c node-x node-gpu; do
  [ -f "$DIR/$name.key_secret" ] || "$ZMESH" keys gen "$name" --dir "$DIR"
done
[ -f "$DIR/client.key_secret" ] || "$ZMESH" keys gen client --role client --dir "$DIR"
chmod 0644 "$DIR"/*.key_secret
echo "keys in $DIR; start with: docker compose -f compose.yaml -f compose.keys.yaml up -d"
