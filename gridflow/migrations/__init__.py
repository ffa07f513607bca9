"""gridflow's Alembic migrations (run them with :func:`gridflow.store.upgrade` or
``gridflow db upgrade --db URL``; see docs/operations.md)."""
