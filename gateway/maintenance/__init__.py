"""`registry-gateway cache du|ls|rm|gc|verify`: the operator's view of a data directory, safe
while the gateway runs: read-mostly, and what `rm` and `verify` delete goes through the
same store and catalogue the gateway uses. Never evicts on its own (`gc` only previews).
"""

from .commands import add_commands

__all__ = ["add_commands"]
