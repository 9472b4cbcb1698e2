"""Runs the whole mesh as local processes: `make up` / `make down`, and the end-to-end tests."""
