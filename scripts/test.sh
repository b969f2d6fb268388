#!/usr/bin/env bash
# The test command: fmt-free, lint-free, just the whole test suite against real
# Postgres and Redis (started temporarily from local binaries when none answer).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

tmp=$(mktemp -d "${TMPDIR:-/tmp}/keel-test.XXXXXX")
chmod 755 "$tmp"
trap 'stop_started_servers; rm -rf "$tmp"' EXIT
ensure_postgres "$tmp/pg" 55432
ensure_redis "$tmp/redis" 56379 no
# The pooler tests (tests/faults, pooler.rs) start a private pgbouncer: Debian's,
# installed here when missing; without it they skip, saying so.
command -v pgbouncer >/dev/null || [ -x /usr/sbin/pgbouncer ] || apt_install pgbouncer \
  || log "pgbouncer is not installed and cannot be (needs root and apt-get): the pooler tests will skip"
# The console's browser tests drive Debian's chromium through chromedriver:
# installed here when missing; without them those tests fail saying how to get
# them, unless KEEL_SKIP_BROWSER_TESTS=1.
{ command -v chromium >/dev/null && command -v chromedriver >/dev/null; } \
  || apt_install chromium chromium-driver \
  || log "chromium/chromedriver are not installed and cannot be (needs root and apt-get): set KEEL_SKIP_BROWSER_TESTS=1 to skip the console's browser tests"
log "testing against Postgres ${DATABASE_URL%%\?*} and Redis $REDIS_URL"

cargo test --workspace --locked "$@"

# The contract from outside Rust: Python stubs generated from proto/, and a
# client that knows nothing but server reflection.
[ -n "${KEEL_SKIP_E2E:-}" ] || scripts/e2e.sh

# Benchmark smoke run: every scenario once, small, debug binaries, no thresholds.
if [ -z "${KEEL_SKIP_BENCH:-}" ]; then
  cargo build --locked -q -p keel-bench
  target/debug/keel-bench --quick --bin-dir target/debug
fi
