#!/bin/sh
# The cost of the commit-outcome marker per write transaction (see bench/RESULTS.md).
# tpcb-like with and without `SELECT pgsidecar.mark_commit(...)` before END, directly against
# PostgreSQL, interleaved round by round so the machine's drift hits each alike. Needs a database
# prepared with `pgbench -i -s 10` and `pgsidecar init-db`.
# Usage: bench/commit_marker/run.sh "host=127.0.0.1 port=5432 user=postgres dbname=postgres" [rounds] [seconds]
set -eu
conninfo=$1
rounds=${2:-3}
seconds=${3:-10}
here=$(dirname "$0")
pgbench=${PGBENCH:-pgbench}
for round in $(seq "$rounds"); do
    for script in tpcb_like marker_round_trip; do
        tps=$("$pgbench" -n -c 4 -j 2 -T "$seconds" -f "$here/$script.sql" "$conninfo" | sed -n 's/^tps = \([0-9.]*\).*/\1/p')
        echo "round $round  simple    $script  tps $tps"
    done
    for script in tpcb_like marker_pipelined; do
        tps=$("$pgbench" -n -M extended -c 4 -j 2 -T "$seconds" -f "$here/$script.sql" "$conninfo" | sed -n 's/^tps = \([0-9.]*\).*/\1/p')
        echo "round $round  extended  $script  tps $tps"
    done
done
