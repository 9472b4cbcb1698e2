"""Session service: conversation history with per-session sequence numbers, the stateful tier."""
