"""The Delta ADS server: meshd's single xDS feed.

``cache`` holds the resources by type URL, versioned by content; ``feed``
turns translated model values into cache entries; ``subscription`` is the
per-stream protocol state (sans I/O); ``server`` is the grpc.aio shell.

May import: ``mesh``, ``controlplane.translate``, ``grpcio`` and ``xds-protos``.
"""
