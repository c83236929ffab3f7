"""The nftables engine: the kernel matches the knocks (docs/NFTABLES.md).

doors.py reads the doors file; load.py is a run of the server (burns read
back, windows planned, one transaction, the record); ruleset.py renders a
plan of doors into one `nft -f` transaction for the table `inet
knockd_rotator` (pure); kernel.py loads it and reads back what the packet
path did; report.py is its check and status.  Below, what the watch and the
timer ask of every engine: LOOK_SECONDS, files, timings, derive_keys.
"""

from knockd_rotator.core.files import read_config
from knockd_rotator.core.plan import Window  # noqa: F401 (a door's windows, for render)
from knockd_rotator.core.settings import rotation_settings
from knockd_rotator.engines.nftables.doors import parse_doors
from knockd_rotator.engines.nftables.kernel import (  # noqa: F401
    apply, read_spent, remove, spent_uses, table_state, TableState)
from knockd_rotator.engines.nftables.ruleset import (  # noqa: F401
    Door, remove_text, render, TABLE)

# The watch runs this often even with no event due, for the burns the kernel
# made and a table someone removed; a run that finds the table as it left
# it, with no new burn, loads nothing (load.py).
LOOK_SECONDS = 2


def files(config_path):
    """The files a run reads besides the environment file: the doors file."""
    return [config_path]


def timings(config_path, environ):
    """{(period, grace, lead)} of the doors of the doors file CONFIG_PATH."""
    found = set()
    for door in parse_doors(read_config(config_path), config_path):
        settings = rotation_settings(environ, door.name)
        found.add((settings.period, settings.grace, settings.lead))
    return found


def derive_keys(config_path, settings_of, moment):
    """Each door's settings, for the key it derives (see
    scheduling.derive_keys); its windows are derived at the load."""
    for door in parse_doors(read_config(config_path), config_path):
        settings_of(door.name)
