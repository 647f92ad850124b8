"""Sources of truth: each turns its objects into a :class:`controlplane.state.SourceState`.

``meshlab`` (a running local cluster's state file), ``file`` (the same shape
from a file) and ``kubernetes`` (list+watch through the official client).
A source publishes a whole new state on every change; meshd translates it.

May import: ``mesh``, ``controlplane.state``, ``controlplane.authz_yaml`` and
third-party libraries.
"""
