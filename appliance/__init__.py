"""ipamd: a distributed IP address manager for containers."""

__version__ = "0.1.0"
