"""Benchmarks: this project beside real peers (Envoy, direct) in one run.

Speed is never asserted by a test; it is measured here and reported as ratios
with the machine and the date in ``bench/RESULTS.md``. May import every
package. Empty until the HBONE issue adds the first benchmark.
"""
