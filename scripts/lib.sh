# Shared shell helpers for scripts/run.sh and scripts/test.sh (sourced, not run).
# ensure_postgres / ensure_redis export DATABASE_URL / REDIS_URL: the ones given,
# else the local defaults when they answer, else temporary servers started from
# local binaries (installed from Debian's packages when missing and we are root).

log() { printf '%s\n' "keel: $*" >&2; }
die() { log "$*"; exit 1; }

KEEL_STARTED_PIDS=()

pg_bindir() {
  local d
  for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    [ -x "$d/initdb" ] && { echo "$d"; return 0; }
  done
  local initdb
  initdb=$(command -v initdb 2>/dev/null) && { dirname "$(readlink -f "$initdb")"; return 0; }
  return 1
}

tcp_open() { # host port
  (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null
}

apt_install() {
  [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null || return 1
  log "installing $* from Debian's packages"
  if [ -z "${KEEL_APT_UPDATED:-}" ]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null || return 1
    export KEEL_APT_UPDATED=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# ensure_postgres DATA_DIR PORT: sets DATABASE_URL (to the server's `postgres` db).
ensure_postgres() {
  local dir=$1 port=$2
  if [ -n "${DATABASE_URL:-}" ]; then return 0; fi
  if tcp_open 127.0.0.1 5432; then
    export DATABASE_URL="postgres://postgres@127.0.0.1:5432/postgres"
    return 0
  fi
  local bin
  bin=$(pg_bindir) || { apt_install postgresql >/dev/null && bin=$(pg_bindir); } \
    || die "Postgres is not running on 127.0.0.1:5432 and no initdb was found; install PostgreSQL or set DATABASE_URL"
  mkdir -p "$dir"
  local as=()
  if [ "$(id -u)" = 0 ]; then
    # Postgres refuses to run as root: run it as the postgres user.
    id postgres >/dev/null 2>&1 || useradd --system --home-dir "$dir" postgres
    chown -R postgres "$dir"
    as=(runuser -u postgres --)
  fi
  if [ ! -f "$dir/data/PG_VERSION" ]; then
    "${as[@]}" "$bin/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 >"$dir/initdb.log" 2>&1 \
      || die "initdb failed, see $dir/initdb.log"
  fi
  if ! tcp_open 127.0.0.1 "$port"; then
    "${as[@]}" "$bin/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -w -t 30 \
      -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=300" start >/dev/null \
      || die "Postgres did not start, see $dir/postgres.log"
    KEEL_PG_STARTED="$bin/pg_ctl -D $dir/data"
    KEEL_PG_AS="${as[*]}"
    log "started Postgres from $bin on 127.0.0.1:$port (data in $dir)"
  fi
  export DATABASE_URL="postgres://postgres@127.0.0.1:$port/postgres"
}

# ensure_redis DATA_DIR PORT PERSIST(yes|no): sets REDIS_URL.
ensure_redis() {
  local dir=$1 port=$2 persist=${3:-no}
  if [ -n "${REDIS_URL:-}" ]; then return 0; fi
  if tcp_open 127.0.0.1 6379; then
    export REDIS_URL="redis://127.0.0.1:6379"
    return 0
  fi
  command -v redis-server >/dev/null || apt_install redis-server \
    || die "Redis is not running on 127.0.0.1:6379 and redis-server was not found; install Redis or set REDIS_URL"
  mkdir -p "$dir"
  if ! tcp_open 127.0.0.1 "$port"; then
    redis-server --bind 127.0.0.1 --port "$port" --daemonize yes --dir "$dir" \
      --pidfile "$dir/redis.pid" --logfile "$dir/redis.log" --appendonly "$persist" --save "" \
      || die "Redis did not start, see $dir/redis.log"
    KEEL_REDIS_PIDFILE="$dir/redis.pid"
    log "started Redis on 127.0.0.1:$port (data in $dir)"
  fi
  export REDIS_URL="redis://127.0.0.1:$port"
}

# Stops the servers this script started (not ones that were already running).
stop_started_servers() {
  if [ -n "${KEEL_PG_STARTED:-}" ]; then
    # shellcheck disable=SC2086
    $KEEL_PG_AS $KEEL_PG_STARTED -m fast stop >/dev/null 2>&1 || true
  fi
  if [ -n "${KEEL_REDIS_PIDFILE:-}" ] && [ -f "$KEEL_REDIS_PIDFILE" ]; then
    kill "$(cat "$KEEL_REDIS_PIDFILE")" 2>/dev/null || true
  fi
}
