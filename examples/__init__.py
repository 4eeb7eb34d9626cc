"""Example services: orders calls billing by RPC and emits events that notifications consumes."""
