#!/usr/bin/env bash
# Install (if needed) and run the whole test suite, slow multi-node and container tests too.
# Extra arguments go to pytest, e.g. `scripts/test.sh -m "not slow and not docker"`.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "test: pytest collected no tests; that is a failure" >&2
fi
exit "$rc"
