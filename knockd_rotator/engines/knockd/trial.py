"""The trial knockd: a file in a new shape is tried on a second knockd that hears nothing before
it is loaded.
"""

import os
import re
import select
import signal
import socket
import subprocess
import tempfile
import time

from knockd_rotator.core.commands import without_secrets
from knockd_rotator.core.errors import EXIT_CONFIG
from knockd_rotator.core.files import log, process_start, trust_state_dir
from knockd_rotator.core.generator import RotatorError
from knockd_rotator.engines.knockd.config import (
    parse_config, PLACEHOLDER_SEQUENCE, with_placeholders)
from knockd_rotator.engines.knockd.grace import split_grace_block
from knockd_rotator.engines.knockd.one_time import KEEPER_MARK, one_time_supplies
from knockd_rotator.engines.knockd.processes import knockd_processes
from knockd_rotator.engines.knockd.reload import last_good


# knockd compiles its filter before it listens: 2 s for 500 doors of 3 ports,
# 2.5 s for 200 of 10.  Longer, and every reload would leave knockd that long deaf.
TRIAL_SECONDS = 30
# The trial's folder in STATE_DIR: TRIAL_PREFIX, then the pid and start time
# (process_start) of the run it belongs to, so that the next run can remove
# it when that run was killed.
TRIAL_PREFIX = "trial-"
TRIAL_OPTIONS = {"LOGFILE": b"logfile", "PIDFILE": b"pidfile", "INTERFACE": None,
                 "USESYSLOG": None}


def file_shape(lines):
    """LINES without what the rotator writes: a file knockd ran in this
    shape takes any sequences the rotator gives it."""
    return b"".join(line.raw for line in with_placeholders(split_grace_block(lines)[0]))


def trial_copy(lines, folder):
    """LINES for the trial knockd, line numbers kept (knockd's messages cite
    them).  Its one_time_sequences files are copies, as a rotation leaves
    them (kept), since knockd writes into the files it is given."""
    copy, supplies = [], {line.number: supply for line, _, supply in one_time_supplies(lines)}
    for line in lines:
        supply = supplies.get(line.number)
        if line.section == b"options" and line.kind == "directive" \
                and line.key in TRIAL_OPTIONS:
            name = TRIAL_OPTIONS[line.key]
            copy.append(b"%s = %s\n" % (name, os.fsencode(os.path.join(folder, name.decode())))
                        if name else b"#\n")
        elif supply is not None and not isinstance(supply, OSError):
            path = os.path.join(folder, "one-time-%d" % line.number)
            with open(path, "wb") as handle:
                handle.write(supply.data if supply.kept else b"%s\n%s\n%s\n" % (
                    supply.data, KEEPER_MARK, PLACEHOLDER_SEQUENCE))
            copy.append(b"one_time_sequences = %s\n" % os.fsencode(path))
        else:
            copy.append(line.raw if line.raw.endswith(b"\n") else line.raw + b"\n")
    return b"".join(copy)


def knockd_trial(lines, settings):
    """Start knockd on a copy of LINES where it hears nobody: (what knockd
    said when it refused them, or None; why the trial could not be made, or
    None).  No trial without a knockd program (KNOCKD_ROTATOR_TRIAL_KNOCKD
    empty, or knockd not installed)."""
    program = settings["TRIAL_KNOCKD"]
    if not program or not os.path.exists(program):
        return None, None
    try:
        trust_state_dir(settings["STATE_DIR"])
        folder = tempfile.mkdtemp(prefix="%s%d-%d-" % (TRIAL_PREFIX, os.getpid(),
                                                         process_start(os.getpid())),
                                  dir=settings["STATE_DIR"])
    except RotatorError as exc:
        return None, exc.what
    except OSError as exc:
        return None, "no folder for it in %s: %s" % (settings["STATE_DIR"], exc.strerror)
    try:
        path = os.path.join(folder, "knockd.conf")
        with open(path, "wb") as handle:
            handle.write(trial_copy(lines, folder))
        command = [program, "-v", "-i", "lo", "-c", path]
        if any(name != "lo" for _, name in socket.if_nameindex()):
            # Other interfaces are to be seen (unlike in the units' private
            # network namespace, PrivateNetwork=): a namespace of its own.
            command = ["unshare", "--net", "--", "sh", "-c", 'ip link set lo up && exec "$@"',
                       "knockd_rotator-trial"] + command
        try:
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       env=without_secrets(os.environ))
        except OSError as exc:
            return None, "%s: %s" % (command[0], exc.strerror)
        try:
            said, deadline = b"", time.monotonic() + TRIAL_SECONDS
            while b"listening on" not in said:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([process.stdout], [], [], left)[0]:
                    return ("it did not listen within %g s (a reload would leave it that "
                            "long deaf, or longer: too many doors?)" % TRIAL_SECONDS), None
                piece = os.read(process.stdout.fileno(), 4096)
                if not piece:
                    break
                said += piece
        finally:
            process.kill()
            errors = process.communicate()[1].decode("utf-8", "replace").strip().splitlines()
        if b"listening on" in said:
            return None, None
        last = errors[-1] if errors else "exit %d" % process.returncode
        if "Operation not permitted" in last or "ermission denied" in last:
            return None, last
        return last, None
    finally:
        import shutil
        shutil.rmtree(folder, ignore_errors=True)


def remove_stale_trials(state_dir):
    """The trial folders of runs that were killed during a trial (called
    under the lock), each with a file of the sequences that were new, and the
    trial knockd that went on reading it."""
    import shutil
    for name in os.listdir(state_dir):
        owner = re.match(re.escape(TRIAL_PREFIX) + r"([0-9]+)-([0-9]+)-", name)
        if owner and process_start(int(owner.group(1))) != int(owner.group(2)):
            folder = os.path.join(state_dir, name)
            for pid in knockd_processes(os.path.join(folder, "knockd.conf")):
                os.kill(pid, signal.SIGKILL)
            shutil.rmtree(folder, ignore_errors=True)


def try_on_knockd(config_path, lines, settings):
    """Refuse LINES, before they are written, when knockd refuses them.
    Only a file in a shape knockd has not run is tried (see file_shape)."""
    good = last_good(settings["STATE_DIR"])
    if good is not None and file_shape(parse_config(good)) == file_shape(lines):
        return
    refusal, untried = knockd_trial(lines, settings)
    if untried:
        log("warning: the new %s was not tried on knockd first (%s)" % (config_path, untried))
    if refusal:
        raise RotatorError("knockd refuses the new %s: %s" % (config_path, refusal),
                           "the file and knockd are as they were; fix what knockd names",
                           EXIT_CONFIG)
