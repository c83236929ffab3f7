#!/usr/bin/env python3
"""knockd-rotator server: keep the [*_ROTATOR] doors of knockd.conf current.

Every section of knockd.conf whose name ends with `_ROTATOR` gets, as its
`sequence`, the sequence of the current period (docs/SPEC.md), derived from the
same secret and settings the clients use.  Then knockd is made to load it.

Usage (as root, from knockd_rotator.timer or knockd_rotator-watch.service):
    knockd_rotator_server.py                 rotate /etc/knockd.conf now
    knockd_rotator_server.py --dry-run       show the diff, change nothing
    knockd_rotator_server.py --watch         rotate at every boundary and grace end
    knockd_rotator_server.py check           knockd's grammar and its silent traps
    knockd_rotator_server.py status --json   for monitoring (Nagios exit codes)
    knockd_rotator_server.py add-client alice --firewall iptables [--pin] [--totp]
    knockd_rotator_server.py list-clients    remove-client alice

Environment (from /etc/knockd_rotator.env, mode 0600, which every run reads
again over the environment it was started with):
    KNOCKD_ROTATOR_SECRET, _PIN, _MODE, _LENGTH, _PORT_MODULO, _PERIOD_MODULO,
    _GRACE, _ALGORITHM     as the client; each also per door, e.g.
                           KNOCKD_ROTATOR_SECRET_ALICE_SSH for [alice_ssh_ROTATOR]
    KNOCKD_ROTATOR_RELOAD_COMMAND   default: systemctl reload knockd
    KNOCKD_ROTATOR_CHECK_COMMAND    default: systemctl is-active --quiet knockd
    KNOCKD_ROTATOR_RECOVER_COMMAND  default: systemctl reload-or-restart knockd
    KNOCKD_ROTATOR_INSTANCE_RELOAD_COMMAND, _INSTANCE_CHECK_COMMAND,
    _INSTANCE_RECOVER_COMMAND, _INSTANCE_KILL_COMMAND
                                    the same for the further knockd, %i for the
                                    instance (knockd_rotator-knockd@%i)
    KNOCKD_ROTATOR_DOORS_PER_KNOCKD doors add-client gives one knockd (10); then
                                    it starts another, on knockd_rotator.d/N.conf
    KNOCKD_ROTATOR_TRIAL_KNOCKD     knockd run on a file in a new shape first
                                    (/usr/sbin/knockd; empty: no trial)
    KNOCKD_ROTATOR_LEAD             seconds before a boundary at which the doors get
                                    the next sequences (10; at most period - grace)
    KNOCKD_ROTATOR_CHECK_SECONDS    how long knockd must stay up after a reload (2)
    KNOCKD_ROTATOR_SERVER_INTERVAL  seconds between timer runs (3600)
    KNOCKD_ROTATOR_STATE_DIR        lock and pending run (/var/lib/knockd_rotator)
    KNOCKD_ROTATOR_ENV_FILE         that file (/etc/knockd_rotator.env); add-client
                                    writes the secrets of new clients into it

Safety:
  - Only the values of `sequence` lines of rotator doors change; every other
    byte of knockd.conf stays as it was.  The new file is checked against
    knockd 0.8's grammar before it is written, and a file in a shape knockd
    has not run is tried on a second knockd that hears nothing, so a file
    knockd would refuse (knockd exits on such a reload) is reported instead
    of loaded.  one_time_sequences files get a keeper line, so that knockd
    does not stop when they are used up.
  - The file is swapped atomically (temp file beside it, same mode and owner,
    fsync, rename, fsync of the folder): a crash leaves the old or the new file.
  - A lock serialises runs.  Nothing is written or reloaded when the file is
    already current.
  - knockd is reloaded (SIGHUP), never restarted: a restart kills the children
    that run stop_command after cmd_timeout, and leaves those ports open.
  - From KNOCKD_ROTATOR_LEAD seconds before a boundary (default 10) the doors
    hold the next period's sequences, and until KNOCKD_ROTATOR_GRACE seconds
    after it a generated block of sibling doors at the end of the file holds
    the sequences before those; the block is removed, byte-exactly, when the
    grace ends (docs/SPEC.md).  So a rotation of many knockd that ends
    seconds late still has every knockd ready at the boundary.
  - If knockd is not running after the reload, the previous file is put back
    and knockd is reloaded or started again; the run then fails.  If knockd
    was not running before (a first install: knockd refuses a door without a
    sequence), it is started with the new file instead of reloaded.
  - knockd.conf is the user's: add-client puts clients beyond
    DOORS_PER_KNOCKD into files the rotator owns, knockd_rotator.d/N.conf
    beside it, each read by a knockd of its own, so that no reload keeps a
    knockd deaf for long.  Every run rotates them all, each as knockd.conf.
  - The secret comes from the environment only and is never logged; only
    add-client prints one, once, for the client it makes.  add-client and
    remove-client change knockd.conf and the environment file under the same
    lock, each atomically, and leave both as they were when anything fails.
"""

import os
import sys

# The package: beside this script in a source tree, in ../lib/knockd_rotator/
# where install.sh puts it (this script in /usr/local/sbin).
HERE = os.path.dirname(os.path.realpath(__file__))
for home in (HERE, os.path.join(HERE, os.pardir, "lib", "knockd_rotator")):
    if os.path.isdir(os.path.join(home, "knockd_rotator")):
        sys.path.insert(0, os.path.normpath(home))
        break
from knockd_rotator import cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(cli.main(os.path.abspath(__file__)))
