"""Protocol definitions: our own ``.proto`` files and the modules generated from them.

The ``.proto`` files are written for this project from the public field
definitions of Istio's APIs, so the wire format (package, message and field
names and numbers) is Istio's: ``istio.workload`` (the Workload API),
``istio.security`` (L4 authorization), ``istio.v1.auth`` (the CA) and
``istio.workload.zds`` (CNI to ztunnel). ``make protos`` (run by ``make
test`` and ``make demo``) generates ``*_pb2.py``, ``*_pb2.pyi`` and
``*_pb2_grpc.py`` beside them; those are build outputs, not in git, and not
linted. Envoy's own types come from the ``xds-protos`` package.

May import: ``protobuf`` and ``grpcio`` (generated code only).
"""
