"""Guardrails of the router: pure detectors (prompt injection, PII, input size) behind a small
interface, each switched on by its own config setting and counted in its own metric."""
