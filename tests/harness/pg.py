"""The real-PostgreSQL cluster builder lives in `demo_app.cluster`: the demo builds the same clusters."""

from demo_app.cluster import *  # noqa: F403
