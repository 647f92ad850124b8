"""The waypoint tests share the HBONE test certificates."""

from tests.unit.hbone.conftest import pki

__all__ = ["pki"]
