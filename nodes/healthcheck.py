#!/opt/zmesh/venv/bin/python
"""Docker HEALTHCHECK of a node: healthy when it answers `zmesh status` on its serve port.

The port is read from the node's own config ($NODE_CONFIG with its ZMESH_* overrides),
so the check follows whatever the config says; a wildcard bind host is asked on
loopback. An explicit endpoint can be given as the first argument. A node with keys
([security]) is asked with its own key pair, which it always accepts.
"""

from __future__ import annotations

import os
import re
import sys

from zmesh.cli import main as zmesh_main
from zmesh.config import ConfigError, load_config


def endpoint() -> tuple[str, list[str]]:
    """The serve endpoint to ask, and the key options (our own key pair, if any)."""
    cfg = load_config(os.environ.get("NODE_CONFIG", "/etc/zmesh/node.toml"))
    ep = re.sub(r"^tcp://(\*|0\.0\.0\.0|\[::\])(?=:)", "tcp://127.0.0.1", cfg.serve_addr)
    key = cfg.security.secret_key_file
    return ep, ([] if key is None else ["--client-key", key, "--server-key", key])


if __name__ == "__main__":
    try:
        ep, keys = endpoint()
    except ConfigError as exc:
        if len(sys.argv) < 2:
            print(f"healthcheck: {exc}", file=sys.stderr)
            sys.exit(1)
        keys = []
    if len(sys.argv) > 1:
        ep = sys.argv[1]
    sys.exit(zmesh_main(["status", "--endpoint", ep, "--timeout", "3", *keys]))
