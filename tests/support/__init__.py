"""Test support: real upstream registries and a token server, the one scripted fake
registry and its faults, the one counting proxy, the one wait helper, image builders,
the client sandbox, and launchers for the gateway, dockerd and friends.

Everything here talks to loopback addresses only and every process or server it
starts has a matching stop that the fixtures call, even when a test fails.
"""
