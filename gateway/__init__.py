"""registry-gateway: one read-only OCI pull-through cache for many upstream registries."""

__version__ = "0.1.0"
