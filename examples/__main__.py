"""Run all example services in this one process: `python -m examples`."""

from examples import billing, notifications, orders  # noqa: F401  (importing registers them)
from sdk import run

if __name__ == "__main__":
    run()
