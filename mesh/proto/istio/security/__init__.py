"""Generated protobuf modules (see ``mesh.proto``)."""
