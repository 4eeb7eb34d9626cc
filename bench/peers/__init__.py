"""Helpers of the `supervisors` benchmark: the supervised children, the supervisors under test, the installs.

`bench.supervisors` measures mrq-supervisor against supervisord, circus and
PM2 running the same child. The installs of the peers live in `bench/.peers/`,
which the benchmark creates and which git ignores.
"""
