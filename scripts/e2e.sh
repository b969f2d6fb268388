#!/usr/bin/env bash
# End-to-end check of the real binaries from outside Rust: starts auth, jobs,
# memory and a worker on free ports against a fresh database and Redis prefix,
# then runs the Python client session, the reflection-only check, the keel CLI,
# and the worker libraries' system tests (clients/python/tests: Python and
# TypeScript workers beside the Rust worker).
# Expects DATABASE_URL and REDIS_URL (scripts/test.sh sets them).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
: "${DATABASE_URL:?DATABASE_URL must point at a Postgres server}" "${REDIS_URL:?REDIS_URL must be set}"

py=clients/python
if [ ! -x "$py/.venv/bin/python" ]; then
  python3 -m venv "$py/.venv" || die "python3 -m venv failed (Debian: apt-get install python3-venv)"
fi
"$py/.venv/bin/pip" install -q --disable-pip-version-check -r "$py/requirements.txt"
# The keel_worker package, its stubs generated from proto/ as it is built
# (grpcio-tools and setuptools come from requirements.txt).
"$py/.venv/bin/pip" install -q --disable-pip-version-check --no-build-isolation --no-deps --force-reinstall "./$py"
"$py/.venv/bin/python" "$py/check_compose.py" compose.yaml Dockerfile
scripts/check_manifests.sh deploy/k8s
"$py/.venv/bin/python" deploy/check_references.py deploy/k8s

cargo build --locked -q -p keel-auth -p keel-jobs -p keel-memory -p keel-worker -p keel-cli
bin=target/debug

tmp=$(mktemp -d "${TMPDIR:-/tmp}/keel-e2e.XXXXXX")
db="keel_e2e_$(date +%s)_$$"
admin_url="${DATABASE_URL%/*}/postgres"
psql_bin=$(command -v psql || echo "$(pg_bindir)/psql")
pids=()
cleanup() {
  [ ${#pids[@]} -gt 0 ] && kill "${pids[@]}" 2>/dev/null
  wait 2>/dev/null || true
  "$psql_bin" "$admin_url" -qc "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" >/dev/null 2>&1 || true
  rm -rf "$tmp"
}
trap cleanup EXIT
"$psql_bin" "$admin_url" -qc "CREATE DATABASE \"$db\""

free_port() { "$py/.venv/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
export DATABASE_URL="${DATABASE_URL%/*}/$db"
export KEEL_REDIS_PREFIX="keel-e2e-$$"
export KEEL_WORKER_TOKEN="e2e-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
export KEEL_JWT_PRIVATE_KEY_FILE="$tmp/jwt/signing.pem" KEEL_JWT_GENERATE_KEY=true
export KEEL_JWT_PUBLIC_KEY_FILES="$tmp/jwt/signing.pem.pub"
export KEEL_AUTH_ADDR="127.0.0.1:$(free_port)" KEEL_JOBS_ADDR="127.0.0.1:$(free_port)"
export KEEL_MEMORY_ADDR="127.0.0.1:$(free_port)" KEEL_WORKER_HEALTH_ADDR="127.0.0.1:$(free_port)"
export KEEL_JOBS_URL="http://$KEEL_JOBS_ADDR"
# Short leases (heartbeats to match) and retries, so the worker tests see a
# killed worker's job handed on, and a retry, within seconds.
export KEEL_JOBS_LEASE_MS=2000 KEEL_WORKER_HEARTBEAT_MS=500 KEEL_JOBS_RETRY_BASE_MS=100

start() { # name addr [log name]
  local log="$tmp/${3:-$1}.log"
  "$bin/keel-$1" >"$log" 2>&1 &
  pids+=($!)
  for _ in $(seq 1 300); do
    "$bin/keel-$1" healthcheck "$2" >/dev/null 2>&1 && return 0
    kill -0 "${pids[-1]}" 2>/dev/null || { cat "$log" >&2; die "keel-$1 exited"; }
    sleep 0.1
  done
  cat "$log" >&2
  die "keel-$1 did not become healthy"
}
start auth "$KEEL_AUTH_ADDR"
start jobs "$KEEL_JOBS_ADDR"
start memory "$KEEL_MEMORY_ADDR"
start worker "$KEEL_WORKER_HEALTH_ADDR"

# A second jobs replica serving TLS only, with a CA made here, for the worker
# libraries' TLS test (tests/test_workers.py).
mkdir -p "$tmp/tls"
openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj "/CN=keel e2e CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign" \
  -keyout "$tmp/tls/ca.key" -out "$tmp/tls/ca.pem" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" \
  -keyout "$tmp/tls/server.key" -out "$tmp/tls/server.csr" 2>/dev/null
printf 'subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth\n' >"$tmp/tls/ext"
openssl x509 -req -in "$tmp/tls/server.csr" -CA "$tmp/tls/ca.pem" -CAkey "$tmp/tls/ca.key" \
  -CAcreateserial -days 1 -extfile "$tmp/tls/ext" -out "$tmp/tls/server.pem" 2>/dev/null
tls_port=$(free_port)
export KEEL_JOBS_TLS_URL="https://localhost:$tls_port" KEEL_E2E_CA_FILE="$tmp/tls/ca.pem"
# (The variables before `start` hold for it and what it runs: the server and
# its TLS healthcheck.)
KEEL_JOBS_ADDR="127.0.0.1:$tls_port" KEEL_TLS_CERT_FILE="$tmp/tls/server.pem" \
  KEEL_TLS_KEY_FILE="$tmp/tls/server.key" KEEL_TLS_CA_FILE="$tmp/tls/ca.pem" \
  start jobs "127.0.0.1:$tls_port" jobs-tls

gen="$tmp/gen"
mkdir -p "$gen"
"$py/.venv/bin/python" -m grpc_tools.protoc -I proto --python_out="$gen" --grpc_python_out="$gen" \
  proto/keel/auth/v1/auth.proto proto/keel/jobs/v1/jobs.proto proto/keel/memory/v1/memory.proto

status=0
PYTHONPATH="$gen" "$py/.venv/bin/python" "$py/session.py" "$KEEL_AUTH_ADDR" "$KEEL_JOBS_ADDR" "$KEEL_MEMORY_ADDR" || status=$?
"$py/.venv/bin/python" "$py/reflection_check.py" "$KEEL_AUTH_ADDR" "$KEEL_JOBS_ADDR" "$KEEL_MEMORY_ADDR" "$KEEL_WORKER_HEALTH_ADDR" || status=$?

# The `keel` CLI's main paths.
cli_passed=0
cli_failed=0
cli_check() { # description, then a command that must succeed
  local what=$1; shift
  if "$@" >/dev/null 2>&1; then
    cli_passed=$((cli_passed + 1))
  else
    cli_failed=$((cli_failed + 1)); log "CLI check failed: $what"; status=1
  fi
}
json() { "$py/.venv/bin/python" -c "import json,sys; d=json.load(sys.stdin); print($1)"; }
export KEEL_CONFIG_DIR="$tmp/cli" KEEL_AUTH_URL="http://$KEEL_AUTH_ADDR" KEEL_MEMORY_URL="http://$KEEL_MEMORY_ADDR"
keel=$bin/keel
cli_email="cli-$$@example.com"
cli_check "register" env KEEL_PASSWORD="correct horse battery" "$keel" register "$cli_email" --name CLI
cli_check "session file is 0600" test "$(stat -c %a "$KEEL_CONFIG_DIR/session.json")" = 600
cli_check "whoami" test "$("$keel" -o json whoami | json 'd["email"]')" = "$cli_email"
cli_check "login" env KEEL_PASSWORD="correct horse battery" "$keel" login "$cli_email"
cli_check "memories put" "$keel" memories put notes/cli --content "the command line client" --tag cli
cli_check "memories get" test "$("$keel" -o json memories get notes/cli | json 'd["version"]')" = 1
cli_check "memories list" test "$("$keel" -o json memories list --prefix notes/ | json 'len(d["memories"])')" = 1
cli_check "memories search" test "$("$keel" -o json memories search "command line" | json 'd[0]["memory"]["key"]')" = notes/cli
cli_check "workspace" test "$("$keel" -o json workspace | json 'd["memory_count"]')" = 1
job_id=$("$keel" -o json jobs create echo --payload '{"x": 1}' | json 'd["id"]') || job_id=
cli_check "jobs watch to SUCCEEDED" test "$("$keel" -o json jobs watch "$job_id" | tail -n 1 | json 'd["status"]')" = SUCCEEDED
cli_check "jobs get" test "$("$keel" -o json jobs get "$job_id" | json 'd["output"]["x"]')" = 1
cli_check "jobs list table" bash -c "'$keel' jobs list --kind echo | head -n 1 | grep -Eq '^ID +KIND +STATUS +ATTEMPT +CREATED$'"
cli_check "jobs list" test "$("$keel" -o json jobs list --kind echo | json 'd["jobs"][0]["id"]')" = "$job_id"
cli_check "cancel of a finished job is refused" bash -c "! '$keel' jobs cancel '$job_id'"
cli_check "health" "$keel" health
cli_check "logout" "$keel" logout
cli_check "signed out" bash -c "! '$keel' whoami"
echo "keel CLI: $cli_passed passed, $cli_failed failed"

# The worker libraries: TypeScript built (types generated) and unit-tested,
# then both run real jobs beside the Rust worker.
ts=clients/typescript
if (cd "$ts" && npm ci --no-audit --no-fund --loglevel=error >/dev/null && npm test --silent); then
  pytest_status=0
  KEEL_TS_CLIENT_DIR="$PWD/$ts" "$py/.venv/bin/python" -m pytest -q -p no:cacheprovider "$py/tests" || pytest_status=$?
  case $pytest_status in
    0) ;;
    5) log "worker tests: pytest collected no tests"; status=1 ;;
    *) log "worker tests failed (pytest exit $pytest_status)"; status=1 ;;
  esac
else
  log "clients/typescript: npm ci / build / unit tests failed"; status=1
fi

# No secret may reach a log line: passwords, tokens, the worker credential.
for f in "$tmp"/*.log; do
  if grep -qE "correct horse battery|$KEEL_WORKER_TOKEN|eyJ[A-Za-z0-9_-]{10,}\." "$f"; then
    log "a secret appears in $(basename "$f")"; status=1
  fi
done
if [ $status -ne 0 ]; then
  for f in "$tmp"/*.log; do echo "--- $(basename "$f")" >&2; tail -n 40 "$f" >&2; done
fi
exit $status
