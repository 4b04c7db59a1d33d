"""The web page and HTTP API (one port): ``python -m ui serve`` / ``python -m ui config``.

Imports ``backends`` only through its public API; nothing imports ``ui`` except its entry point.
"""
