"""Small programs pods run in meshlab (``meshlab app NAME``).

They may import the standard library and the project's declared dependencies
(the echo app uses ``httptools``, ``h2`` and ``grpcio``); never ``mesh``,
``ztunnel``, ``waypoint`` or ``controlplane``: a pod's program knows nothing of the mesh.
"""
