"""The burn command of single-use doors and its gate in the shell."""

import os

from knockd_rotator.core import commands
from knockd_rotator.core.commands import without_secrets
from knockd_rotator.core.errors import EXIT_ENVIRONMENT, EXIT_USAGE
from knockd_rotator.core.generator import RotatorError
from knockd_rotator.core.plan import GRACE_SUFFIX
from knockd_rotator.core.settings import server_settings
from knockd_rotator.core.uses import BURNING
from knockd_rotator.engines.knockd.config import one_line
from knockd_rotator.engines.knockd.grace import burn_gate
from knockd_rotator.engines.knockd.instances import settings_for


def reopen_gate(config_path, environ, door, use):
    """After a burn of USE that failed: let the next opening of it start a
    burn again.  The gate lets only the first opening through, and a use
    that was never counted would open the door for the rest of its period."""
    base = door[:-len(GRACE_SUFFIX)] if door.endswith(GRACE_SUFFIX) else door
    try:
        folder = os.path.join(settings_for(config_path, server_settings(environ))["STATE_DIR"],
                              BURNING)
        os.rmdir(os.path.join(folder, "%s.%d.%d.burn" % ((base,) + use)))
    except (RotatorError, OSError):
        pass       # no gate to reopen


def burn_command(config_path, door, environ):
    """The start of a single-use door's start_command: `burn DOOR` in the
    background, so that the port opens without waiting for the reload.
    knockd's child has no KNOCKD_ROTATOR_* variable: the ones this run has
    (its settings, and the environment file's path) go along, but never a
    secret, a SALT or a PIN, which the burn reads from the environment file.
    A shell gate in front records each opening and starts the burn for the
    first opening of a use only (see single use); the rotation writes the
    use (0:0 here) as it writes the sequence.  Without the state folder's
    BURNING folder every opening burns, as before the gate."""
    import shlex
    settings = sorted((name, value) for name, value in without_secrets(environ).items()
                      if name.startswith("KNOCKD_ROTATOR_"))
    for name, value in settings:
        one_line(name, value, "unset it, or remove the character", EXIT_ENVIRONMENT)
    path = os.path.realpath(config_path)
    one_line("the path %r" % path, path, "give knockd.conf a path without one", EXIT_USAGE)
    folder = os.path.join(settings_for(path, server_settings(environ))["STATE_DIR"], BURNING)
    one_line("the state folder %r" % folder, folder,
             "set KNOCKD_ROTATOR_STATE_DIR to a path without one", EXIT_ENVIRONMENT)
    assignments = ["%s=%s" % (name, shlex.quote(value)) for name, value in settings]
    return " ".join([burn_gate(folder, door)] + assignments + [
        shlex.quote(commands.SCRIPT), "--config", shlex.quote(path), "burn", door, "--use", "0:0",
        "& "])
