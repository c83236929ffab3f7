"""Engines: how the doors are enforced.  knockd/ loads knockd.conf into knockd
(its __init__.py is the seam the rotation and status drive: prepare, resume,
plan, keep, diff, loaded, heal, confirm, fallback, apply, settle, status);
nftables.py has the kernel match the knocks (issue 25, not yet wired to the
seam)."""
