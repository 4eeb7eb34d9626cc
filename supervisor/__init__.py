"""The mrq supervisor: runs, watches and restarts every service instance of a node."""
