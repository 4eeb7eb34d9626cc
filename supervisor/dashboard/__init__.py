"""The web dashboard and `/metrics` of a supervisor node.

`Dashboard` is the node extension that `mrq-supervisor start` adds when the
`dashboard` setting is not "off". The page, its API and the metrics are
described in docs/dashboard.md.
"""

from supervisor.dashboard.app import Dashboard, DashboardError, build_app
from supervisor.dashboard.metrics import NodeCollector

__all__ = ["Dashboard", "DashboardError", "NodeCollector", "build_app"]
