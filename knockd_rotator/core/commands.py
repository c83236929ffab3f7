"""Shell commands the settings name (reload, check, recover, kill, firewall checks), run without
the secrets.
"""

import os
import subprocess


# The command users run, which boundary runs start again and burn commands
# name: cli.main() is given the script that started this run; a caller that
# imports the package gets the source tree's.
SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                      "knockd_rotator_server.py")

COMMAND_TIMEOUT = 30     # seconds a reload, check or recover command may take


def without_secrets(environ):
    """ENVIRON less every secret and PIN, and every SALT (a legacy door's
    secret): the reload, check, recover and kill commands, and a knockd one
    of them starts, need none."""
    return {name: value for name, value in environ.items()
            if not name.startswith(("KNOCKD_ROTATOR_SECRET", "KNOCKD_ROTATOR_PIN",
                                    "KNOCKD_ROTATOR_SALT"))}


def run_command(command):
    """Run a shell command line: (success, last line of its output)."""
    try:
        result = subprocess.run(command, shell=True, stdin=subprocess.DEVNULL,
                                env=without_secrets(os.environ),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                timeout=COMMAND_TIMEOUT)
    except subprocess.TimeoutExpired:
        return False, "timed out after %d s" % COMMAND_TIMEOUT
    output = result.stdout.decode("utf-8", "replace").strip().splitlines()
    detail = "exit %d%s" % (result.returncode, ": " + output[-1] if output else "")
    return result.returncode == 0, detail
