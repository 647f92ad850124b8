"""Sources of truth: each turns its objects into a :class:`controlplane.state.SourceState`.

``local``: ``meshlab`` (a running local cluster's state file) and ``file``
(the same shape from a file). ``kubernetes``: list+watch through the official
client, from ``kube_informer`` (one list+watch thread per kind),
``kube_convert`` (the kinds, and each object into source state) and
``kube_client`` (a client for the API server, and its TokenReview).
A source publishes a whole new state on every change; meshd translates it.

May import: ``mesh``, ``controlplane.state``, ``controlplane.authz_yaml``,
``controlplane.l7`` (the Gateway and route readers, to refuse a malformed
object alone) and third-party libraries.
"""
