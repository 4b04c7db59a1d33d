"""Reliability and security, each guarantee reproduced by a test (docs/RELIABILITY.md lists them)."""
