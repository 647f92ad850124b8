"""The test suite.

``tests/unit`` runs anywhere without privileges; ``tests/integration`` builds
real network namespaces and needs root plus the host tools named in each skip
reason. CI runs as root and runs everything. Tests may import every package.
"""
