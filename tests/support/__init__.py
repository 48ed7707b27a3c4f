"""Test support: real upstream registries, a token server, a counting proxy, image
builders, and launchers for the gateway, dockerd and friends.

Everything here talks to loopback addresses only and every process or server it
starts has a matching stop that the fixtures call, even when a test fails.
"""
