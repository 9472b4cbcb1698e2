"""Alembic migrations of the session schema (run through services.session.migrate)."""
