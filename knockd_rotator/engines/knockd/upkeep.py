"""Keeping knockd well between reloads: a restart when its heap has grown, a stopped knockd
resumed.
"""

import os
import signal
import time

from knockd_rotator.core.commands import run_command
from knockd_rotator.core.errors import EXIT_RECOVERY
from knockd_rotator.core.files import keep_state
from knockd_rotator.core.generator import RotatorError
from knockd_rotator.engines.knockd.processes import knockd_processes, main_knockd
from knockd_rotator.engines.knockd.reload import CHECK_POLL, remember_loaded, start_knockd


# knockd 0.8 leaks about 80 to 290 bytes per door at every reload while it
# listens on IPv6 (its IPv6 filter string is never freed): 100 single-use
# doors opened 100 times a day each grow it by 0.3 to 1 GB a year.  A restart frees it,
# and costs nothing but the knocks in progress while no child waits to run a
# stop_command.  So, past LEAK_BOUND of growth since the rotator first saw
# this knockd, a rotation restarts it at such a moment (knockd -4 does not
# leak: docs/SCALE.md).
LEAK_BOUND = 64 * 2**20
KNOCKD_SIZE = "knockd-size"      # state: "PID RSS" of knockd when first seen
IDLE_LOOK = 0.1          # seconds knockd must use no CPU to be at rest


def resident_bytes(pid):
    with open("/proc/%d/status" % pid) as handle:
        for row in handle:
            if row.startswith("VmRSS:"):
                return int(row.split()[1]) * 1024
    raise OSError("no VmRSS")


def restart_when_grown(config_path, settings):
    """Restart the knockd reading CONFIG_PATH when it has grown by more than
    LEAK_BOUND since it was first seen and no child of it waits to run a
    stop_command: a line for the log, or None."""
    found = knockd_processes(config_path)
    main = main_knockd(found)
    if len(main) != 1:
        return None
    pid, path = main[0], os.path.join(settings["STATE_DIR"], KNOCKD_SIZE)
    try:
        size = resident_bytes(pid)
    except OSError:
        return None
    try:
        with open(path) as handle:
            seen_pid, seen_size = (int(word) for word in handle.read().split())
    except (OSError, ValueError):
        seen_pid, seen_size = None, None
    if seen_pid == pid and (size - seen_size <= LEAK_BOUND
                            or any(parent == pid for parent, _, _ in found.values())):
        return None
    # Sizes that count are those of a knockd at rest (SIZE was, if it used
    # no CPU since): while it compiles a filter it is smaller, then bigger.
    time.sleep(IDLE_LOOK)
    again = knockd_processes(config_path).get(pid)
    if again is None or again[1:] != ("S", found[pid][2]):
        return None
    if seen_pid != pid:
        keep_state(path, b"%d %d\n" % (pid, size))
        return None
    killed, detail = run_command(settings["KILL_COMMAND"])
    if killed:
        killed, detail = start_knockd(config_path, settings)
    if not killed:
        raise RotatorError("knockd had grown by %d MB and was to be restarted, which failed (%s)"
                           % ((size - seen_size) >> 20, detail),
                           "start knockd now: systemctl start %s" % settings["UNIT"],
                           EXIT_RECOVERY)
    return ("knockd had grown by %d MB since it was first seen (knockd 0.8 leaks at every "
            "reload with IPv6): restarted it, with no stop_command pending"
            % ((size - seen_size) >> 20))


# A stopped knockd (SIGSTOP, a job-control stop, a debugger) is `active` and
# passes the check command, yet hears no knock; its children that wait to run
# a stop_command run it only once they go on.  SIGCONT to each of them loses
# nothing: knockd keeps its doors, the stop_commands run (late).  A knockd that
# stays stopped (a debugger holds it) is hung: ended and started again with
# the file on disk, which costs the pending stop_commands, as after a reload.
RESUME_PATIENCE = 1


def resume_stopped_knockd(config_path, settings, data):
    """Let the stopped knockd processes reading CONFIG_PATH (which holds
    DATA) go on: a warning to log, or None."""
    found = knockd_processes(config_path)
    stopped = [pid for pid, (_, state, _) in found.items() if state in "Tt"]
    if not stopped:
        return None
    for pid in stopped:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
    main = [pid for pid in main_knockd(found) if pid in stopped]
    deadline = time.monotonic() + RESUME_PATIENCE
    while True:
        again = knockd_processes(config_path)
        held = [pid for pid in main if pid in again and again[pid][1] in "Tt"]
        if not held or time.monotonic() > deadline:
            break
        time.sleep(CHECK_POLL)
    if not held:
        return ("knockd (%s) was stopped, hearing no knock: sent it SIGCONT"
                % ", ".join("pid %d" % pid for pid in stopped))
    why = "knockd (pid %d) stays stopped after a SIGCONT (a debugger holds it?)" % held[0]
    killed, detail = run_command(settings["KILL_COMMAND"])
    if killed:
        killed, detail = start_knockd(config_path, settings)
    if not killed:
        raise RotatorError("%s, and ending it and starting it again failed (%s)" % (why, detail),
                           "kill knockd and start it now: systemctl kill --signal=KILL "
                           "{0}; systemctl start {0}".format(settings["UNIT"]), EXIT_RECOVERY)
    remember_loaded(settings["STATE_DIR"], data)
    return why + ": ended it and started it again with %s" % config_path
