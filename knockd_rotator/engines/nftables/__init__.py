"""The nftables engine: the kernel matches the knocks (issue 25).

ruleset.py renders a plan of doors into one `nft -f` transaction for the
table `inet knockd_rotator` (pure); kernel.py loads it and reads back what
the packet path did (burned single-use sequences).
"""

from knockd_rotator.engines.nftables.kernel import apply, read_spent, spent_uses  # noqa: F401
from knockd_rotator.engines.nftables.ruleset import (  # noqa: F401
    Door, remove_text, render, TABLE, Window)
from knockd_rotator.engines.nftables.kernel import (  # noqa: F401,E402
    parse_table_state, remove, table_state, TableState)
