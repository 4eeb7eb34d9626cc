"""Benchmarks of mrq against raw aio-pika doing the same work; run them with `scripts/bench`.

Each benchmark is a module of this package listed in `bench.registry`, with a
`run(context)` function that returns a `bench.results.BenchResult`. The
modules in `bench.roles` are the child processes that the benchmarks start.
"""
