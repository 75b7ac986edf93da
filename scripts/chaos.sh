#!/usr/bin/env bash
# The chaos suite (issue 19; README "Chaos suite"): three `tether serve` replicas behind a private
# nginx, the vendor simulators with faults, a steady workload, SIGKILLs, a PostgreSQL restart and a
# rolling SIGTERM restart; one line per checked property and a summary; exit 0 only if all held.
#
#   scripts/chaos.sh            # the full run: 10,000 changes (about 25 minutes here)
#   scripts/chaos.sh --short    # the CI run: 600 changes, same faults (2–4 minutes)
#   scripts/chaos.sh --replicas 1 --changes 2000 --rate 15   # see tether-chaos --help
#
# It uses the debug binaries as `cargo test` builds them (`cargo test --no-run`: after `cargo test`
# in CI nothing is built again; a plain `cargo build` would compile the library once more, since
# the tests build it with tokio's test-util feature) and needs PostgreSQL's server binaries and nginx: Debian's nginx-light is installed
# when nginx is missing (as root; otherwise it says what to install).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "chaos.sh: nginx is not installed; install Debian's nginx-light (apt-get install nginx-light)" >&2
    exit 2
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends nginx-light
fi
cargo test --locked --no-run
exec ./target/debug/tether-chaos "$@"
