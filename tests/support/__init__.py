"""Test support that stands in where the real thing cannot run on this machine."""
