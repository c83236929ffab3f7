"""Engines: how the doors are enforced (nftables: the kernel matches the knocks)."""
