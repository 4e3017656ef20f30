#!/bin/sh
# Entrypoint of the node image.
#   (no arguments) | node [ARGS]   run a node from $NODE_CONFIG with JSON logs on stdout
#   PROGRAM [ARGS]                 run a program of the image (zmesh-workload, sh, ...)
#   ARGS                           anything else is a zmesh command: ask, status, bench
#
# NODE_AUTO_IDENTITY=1: replicas of one service (`--scale`) share a config, so each
# takes its container hostname as node_id and advertises its own IP. The ports must
# then be NODE_SERVE_PORT / NODE_GOSSIP_PORT (default 5555 / 5556), as in the config.
set -eu
NODE_CONFIG=${NODE_CONFIG:-/etc/zmesh/node.toml}

if [ "$#" -eq 0 ] || [ "$1" = node ]; then
  [ "$#" -gt 0 ] && shift
  if [ "${NODE_AUTO_IDENTITY:-0}" = 1 ]; then
    ip=$(hostname -i | cut -d' ' -f1)
    export ZMESH_NODE_ID="${ZMESH_NODE_ID:-$(hostname)}"
    export ZMESH_ADVERTISE_SERVE="tcp://$ip:${NODE_SERVE_PORT:-5555}"
    export ZMESH_ADVERTISE_GOSSIP="tcp://$ip:${NODE_GOSSIP_PORT:-5556}"
  fi
  exec zmesh node --config "$NODE_CONFIG" --log-format json "$@"
fi
if command -v "$1" >/dev/null 2>&1; then
  exec "$@"
fi
exec zmesh "$@"
