-- Aurora PostgreSQL's topology functions, emulated on plain PostgreSQL streaming replication so the
-- sidecar's `aurora` and `aurora-global` providers run against real servers in tests and the demo.
-- Instance id = cluster_name; a replica finds its writer's id by the port it streams from.
-- SECURITY DEFINER: the replication views hide their interesting columns from ordinary roles,
-- and the sidecar probes as an application role, as it would on Aurora.

CREATE TABLE IF NOT EXISTS aurora_emulation_nodes (
    port integer PRIMARY KEY,
    server_id text NOT NULL UNIQUE,
    aws_region text NOT NULL
);

CREATE OR REPLACE FUNCTION aurora_db_instance_identifier() RETURNS text
LANGUAGE sql STABLE AS $$ SELECT current_setting('cluster_name') $$;

CREATE OR REPLACE FUNCTION aurora_replica_status()
RETURNS TABLE (server_id text, session_id text, last_update_timestamp timestamptz, replica_lag_in_msec real)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, public AS $$
    -- The instance answering.
    SELECT current_setting('cluster_name'),
           CASE WHEN pg_is_in_recovery() THEN 'replica-session' ELSE 'MASTER_SESSION_ID' END,
           now(), 0::real
    UNION ALL
    -- A writer's replicas.
    SELECT r.application_name, 'replica-session', now(),
           (extract(epoch FROM coalesce(r.replay_lag, interval '0')) * 1000)::real
    FROM pg_stat_replication r
    WHERE NOT pg_is_in_recovery()
    UNION ALL
    -- A replica's writer, as last heard from while streaming.
    SELECT n.server_id, 'MASTER_SESSION_ID', w.last_msg_receipt_time, 0::real
    FROM pg_stat_wal_receiver w JOIN public.aurora_emulation_nodes n ON n.port = w.sender_port
    WHERE pg_is_in_recovery() AND w.status = 'streaming'
$$;

CREATE OR REPLACE FUNCTION aurora_global_db_instance_status()
RETURNS TABLE (server_id text, session_id text, aws_region text, visibility_lag_in_msec real)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, public AS $$
    SELECT s.server_id, s.session_id, coalesce(n.aws_region, 'unknown'), s.replica_lag_in_msec
    FROM public.aurora_replica_status() s
    LEFT JOIN public.aurora_emulation_nodes n ON n.server_id = s.server_id
$$;
