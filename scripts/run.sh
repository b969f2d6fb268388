#!/usr/bin/env bash
# Runs the whole system locally: auth, jobs, memory, a worker and the operator
# console, against the
# given DATABASE_URL / REDIS_URL, else local Postgres and Redis on their default
# ports, else Postgres and Redis started here with their data kept in .keel/.
# Ctrl-C stops everything it started.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

state="$PWD/.keel"
mkdir -p "$state/logs" "$state/jwt"

user_db_url=${DATABASE_URL:-}
ensure_postgres "$state/postgres" 5432
ensure_redis "$state/redis" 6379 yes
if [ -z "$user_db_url" ]; then
  # Our own database beside whatever else the server holds.
  psql_bin=$(command -v psql || echo "$(pg_bindir)/psql")
  if ! "$psql_bin" "$DATABASE_URL" -tAc "SELECT 1 FROM pg_database WHERE datname = 'keel'" | grep -q 1; then
    "$psql_bin" "$DATABASE_URL" -qc "CREATE DATABASE keel" || die "cannot create database keel"
    log "created database keel"
  fi
  export DATABASE_URL="${DATABASE_URL%/*}/keel"
fi

[ -s "$state/worker-token" ] || head -c 32 /dev/urandom | base64 | tr -d '=+/\n' > "$state/worker-token"
export KEEL_WORKER_TOKEN=$(cat "$state/worker-token")
export KEEL_JWT_PRIVATE_KEY_FILE="$state/jwt/signing.pem"
export KEEL_JWT_GENERATE_KEY=true
export KEEL_JWT_PUBLIC_KEY_FILES="$state/jwt/signing.pem.pub"
export KEEL_AUTH_ADDR=${KEEL_AUTH_ADDR:-127.0.0.1:50051}
export KEEL_JOBS_ADDR=${KEEL_JOBS_ADDR:-127.0.0.1:50052}
export KEEL_MEMORY_ADDR=${KEEL_MEMORY_ADDR:-127.0.0.1:50053}
export KEEL_WORKER_HEALTH_ADDR=${KEEL_WORKER_HEALTH_ADDR:-127.0.0.1:50054}
export KEEL_CONSOLE_ADDR=${KEEL_CONSOLE_ADDR:-127.0.0.1:8080}
export KEEL_JOBS_URL="http://$KEEL_JOBS_ADDR"
export KEEL_AUTH_URL="http://$KEEL_AUTH_ADDR"
export KEEL_MEMORY_URL="http://$KEEL_MEMORY_ADDR"
# Accounts registered with these emails hold the admin role (the console's
# operators); passed through when set.
if [ -n "${KEEL_ADMIN_EMAILS:-}" ]; then export KEEL_ADMIN_EMAILS; fi

log "building (release)"
cargo build --release --locked -p keel-auth -p keel-jobs -p keel-memory -p keel-worker -p keel-console
bin=target/release

pids=()
cleanup() {
  trap - EXIT INT TERM
  if [ ${#pids[@]} -gt 0 ]; then
    kill "${pids[@]}" 2>/dev/null || true
    # Each binary drains on SIGTERM; give them their grace, then make sure.
    for _ in $(seq 1 75); do
      alive=0
      for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
      [ $alive = 0 ] && break
      sleep 0.2
    done
    kill -KILL "${pids[@]}" 2>/dev/null || true
  fi
  stop_started_servers
}
trap cleanup EXIT
trap 'exit 130' INT TERM

start() { # name addr
  local name=$1 addr=$2
  "$bin/keel-$name" > >(tee -a "$state/logs/$name.log" | sed -u "s/^/[$name] /") 2>&1 &
  pids+=($!)
  for _ in $(seq 1 150); do
    "$bin/keel-$name" healthcheck "$addr" >/dev/null 2>&1 && return 0
    kill -0 "${pids[-1]}" 2>/dev/null || die "keel-$name exited; see $state/logs/$name.log"
    sleep 0.2
  done
  die "keel-$name did not become healthy on $addr"
}

start auth "$KEEL_AUTH_ADDR"    # generates the signing key on first run
start jobs "$KEEL_JOBS_ADDR"
start memory "$KEEL_MEMORY_ADDR"
start worker "$KEEL_WORKER_HEALTH_ADDR"
start console "$KEEL_CONSOLE_ADDR"  # HTTP; its healthcheck asks GET /healthz
if [ -n "${KEEL_ADMIN_EMAILS:-}" ]; then
  admins="operators: $KEEL_ADMIN_EMAILS"
else
  admins="set KEEL_ADMIN_EMAILS=you@example.com before registering to get in"
fi

cat <<MSG

Keel is running (logs in .keel/logs/):
  auth    $KEEL_AUTH_ADDR     keel.auth.v1.AuthService
  jobs    $KEEL_JOBS_ADDR     keel.jobs.v1.JobsService, keel.jobs.v1.JobRunnerService
  memory  $KEEL_MEMORY_ADDR     keel.memory.v1.MemoryService
  worker  $KEEL_WORKER_HEALTH_ADDR     grpc.health.v1.Health
  console http://$KEEL_CONSOLE_ADDR/   the operator console ($admins)
Try:
  grpcurl -plaintext $KEEL_AUTH_ADDR list
  grpcurl -plaintext -d '{"email":"me@example.com","password":"correct horse battery","display_name":"Me"}' $KEEL_AUTH_ADDR keel.auth.v1.AuthService/Register
Ctrl-C stops everything.

MSG

# Supervise: if any part exits, stop the rest.
wait -n "${pids[@]}" || true
die "a Keel process exited; stopping the others (logs in .keel/logs/)"
