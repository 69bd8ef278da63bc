"""The minion-side wrapper of Saltpeter (stdlib only, Python 3.9+)."""

WRAPPER_VERSION = "2.0.0"
