"""pgsidecar: a PostgreSQL wire-protocol sidecar that keeps writes through failover and outage."""

from . import compiled

# Before any data-path module is imported: use the compiled build only if it matches the sources.
compiled.select()
