"""The mrq worker: runs one instance of a Python service under the supervisor."""
