#!/usr/bin/env bash
# Instructions per transaction in the sidecar's process, counted by callgrind (deterministic,
# unlike the CPU time `make bench` prints on a shared machine): pgbench -S, 8 clients, run twice
# (100 and 400 transactions per client) and the difference divided by the 2,400 extra
# transactions, so startup and logins cancel out. Probes are slowed to one per 30 s for the same
# reason. ARCHITECTURE.md, "The compiled data path", rule 12.
#
#   bench/callgrind_tx.sh [CHECKOUT] [session|transaction] [select-only|tpcb-like] [YAML]
#
# YAML: extra top-level config for the sidecar, e.g. 'failover: {transaction_replay: false}' (the
# probe settings below are then yours to repeat), to measure a feature against the same build.
# CHECKOUT (default: this one) must be built (`make build`) to measure the compiled data path.
# Needs valgrind (apt-get install -y valgrind) and PostgreSQL 15; run as root or as a user that
# may run PostgreSQL.
set -euo pipefail
ROOT=$(cd "${1:-$(dirname "$0")/..}" && pwd)
MODE=${2:-session}
SCRIPT=${3:-select-only}
PROBES='failover: {check_interval: 30s, probe_timeout: 5s}'
EXTRA=${4:-$PROBES}
PY=${PYTHON:-$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python}
BIN=$(pg_config --bindir 2>/dev/null || echo /usr/lib/postgresql/15/bin)
command -v valgrind >/dev/null || { echo "valgrind is not installed (apt-get install -y valgrind)" >&2; exit 2; }
WORK=$(mktemp -d /tmp/pgsidecar-callgrind.XXXXXX)
chmod 755 "$WORK"
[ "$(id -u)" = 0 ] && chown postgres "$WORK"
# Fixed ports unless given (bench/continuity_cost.py passes free ones): two runs at once on the
# same ports would measure each other's sidecar.
PGPORT=${CALLGRIND_PG_PORT:-55990}
PROXYPORT=${CALLGRIND_PROXY_PORT:-56432}
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
cleanup() {
  as_pg "$BIN/pg_ctl" -D "$WORK/data" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT
mkdir "$WORK/data"
[ "$(id -u)" = 0 ] && chown postgres "$WORK/data"
as_pg "$BIN/initdb" -A trust -U postgres -D "$WORK/data" >/dev/null
as_pg "$BIN/pg_ctl" -D "$WORK/data" -o "-p $PGPORT -k $WORK" -l "$WORK/pg.log" start >/dev/null
"$BIN/pgbench" -h 127.0.0.1 -p $PGPORT -U postgres -i -s 1 postgres >/dev/null 2>&1
cat > "$WORK/sidecar.yaml" <<YAML
listen: 127.0.0.1:$PROXYPORT
metrics_listen: null
log_level: warning
pool: {mode: $MODE, size: 8}
auth: {method: trust, users: [{name: postgres, password: unused}]}
upstream: {topology: static, tls: disable, probe_user: postgres, regions: [{name: r1, hosts: ["127.0.0.1:$PGPORT"]}]}
spool: {backend: none}
$EXTRA
YAML
# The ledgers (spool, commit markers) as an operator would create them: with them, writing
# transactions pay for their commit marker as they would in production.
(cd "$ROOT" && "$PY" -m proxy init-db -c "$WORK/sidecar.yaml" -d postgres >"$WORK/init-db.log" 2>&1) \
  || { cat "$WORK/init-db.log" >&2; exit 1; }
count() {  # $1: transactions per client -> the sidecar process's instruction total
  rm -f "$WORK"/cg.out.*
  (cd "$ROOT" && exec valgrind --tool=callgrind --callgrind-out-file="$WORK/cg.out.%p" \
      "$PY" -m proxy run -c "$WORK/sidecar.yaml" >"$WORK/sidecar.log" 2>&1) &
  local pid=$!
  for _ in $(seq 1 240); do "$BIN/pg_isready" -q -h 127.0.0.1 -p $PROXYPORT && break; sleep 0.5; done
  "$BIN/pgbench" -n -h 127.0.0.1 -p $PROXYPORT -U postgres -b "$SCRIPT" -c 8 -j 2 -t "$1" postgres >"$WORK/pgbench.log" 2>&1 \
    || { cat "$WORK/pgbench.log" "$WORK/sidecar.log" >&2; kill -INT $pid; exit 1; }
  kill -INT $pid; wait $pid || true
  # (%.0f, not %d: mawk's %d stops at 2^31, which a session-mode run passes.)
  grep -h '^summary' "$WORK"/cg.out.* | awk '{s += $2} END {printf "%.0f\n", s}'
}
small=$(count 100)
large=$(count 400)
if [ "$small" -le 0 ] || [ "$large" -le "$small" ]; then
  echo "callgrind counted $small then $large instructions: no usable figure (another sidecar on port $PROXYPORT?)" >&2
  cat "$WORK/sidecar.log" >&2
  exit 1
fi
echo "$ROOT $MODE $SCRIPT: $(( (large - small) / 2400 )) instructions per transaction (callgrind, pgbench -c 8)"
