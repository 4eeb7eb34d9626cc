"""Child processes of the benchmarks, started as `python -m bench.roles.<module> ROLE PARAMS_JSON`.

A child reads its parameters from a JSON object in its last argument and
reports JSON lines on stdout (see `bench.roles.protocol`). These modules
import only what their role needs, so that start-up figures stay honest.
"""
