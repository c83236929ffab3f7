"""Engines: how the doors are enforced.  knockd/ loads knockd.conf into knockd
(its __init__.py is the seam the rotation and status drive); nftables/ has
the kernel match the knocks.  Both have LOOK_SECONDS, files, timings and derive_keys for
the watch and the timer; KNOCKD_ROTATOR_ENGINE chooses (chosen)."""


def chosen(settings):
    """The engine's package that SETTINGS["ENGINE"] names."""
    # Imported here: each engine's modules import this package first.
    from knockd_rotator.engines import knockd, nftables
    return nftables if settings["ENGINE"] == "nftables" else knockd
