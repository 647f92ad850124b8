"""The eBPF capture backend: BPF C programs and their bcc loader.

Owns: the programs that steer pod traffic to ztunnel without iptables, and
the code that compiles, attaches and detaches them. Empty until the eBPF
capture issue lands.

May import: ``mesh``, ``bcc`` and the standard library. Never the programs
(``controlplane``, ``ztunnel``, ``waypoint``, ``meshlab``).
"""
