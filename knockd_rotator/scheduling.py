"""Timer mode: boundary runs that the timer's service leaves for an event before its next run,
retries, the pending record.
"""

import os
import signal
import subprocess
import sys
import time

from knockd_rotator import engines
from knockd_rotator.core import commands
from knockd_rotator.core.files import log, process_start, replace_file, take_lock, utc
from knockd_rotator.core.generator import RotatorError
from knockd_rotator.core.plan import next_event
from knockd_rotator.core.settings import server_settings, settings_reader, with_env_file


# A boundary this much after the next timer run is still taken by a boundary
# run: the timer may fire a little late.
TIMER_SLACK = 60
# A failed event (a reload knockd refused, a busy lock) is tried again at the
# doors' next event, or this many seconds later if that comes first.
RETRY_SECONDS = 60


def pending_boundary_pid(state_dir):
    """(pid, boundary) of the pending boundary run, or (None, None)."""
    try:
        with open(os.path.join(state_dir, "pending")) as handle:
            pid, start = (int(field) for field in handle.read().split())
        if process_start(pid) == start:
            with open("/proc/%d/cmdline" % pid, "rb") as handle:
                arguments = handle.read().split(b"\0")
            return pid, int(arguments[arguments.index(b"--at") + 1])
    except (OSError, ValueError, IndexError):
        pass
    return None, None


def schedule_boundary_run(config_path, boundary, now, settings, verbose):
    if boundary is None or boundary > now + settings["SERVER_INTERVAL"] + TIMER_SLACK:
        return
    state_dir = settings["STATE_DIR"]
    pid, pending = pending_boundary_pid(state_dir)
    if pid == os.getpid():
        pid = None           # this is the boundary run itself, about to end
    if pid and pending == boundary:
        if verbose:
            log("the run for %s is already pending (pid %d)" % (utc(boundary), pid))
        return
    if pid:
        os.kill(pid, signal.SIGTERM)
    command = [sys.executable, commands.SCRIPT, "--config",
               os.path.abspath(config_path), "--at", str(boundary)]
    if verbose:
        command.append("--verbose")
    child = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             start_new_session=True, close_fds=True)
    # Not waited for, the child keeps its /proc entry even if it has ended.
    replace_file(os.path.join(state_dir, "pending"),
                 b"%d %d\n" % (child.pid, process_start(child.pid)), create=True)
    log("next run at %s (boundary run, pid %d)" % (utc(boundary), child.pid))


def end_pending_boundary_run(state_dir):
    """Stop the timer's pending boundary run: the watch rotates instead.
    systemd's Conflicts= does not reach it, since its oneshot has ended."""
    pid, pending = pending_boundary_pid(state_dir)
    if pid:
        os.kill(pid, signal.SIGTERM)
        log("ended the timer's boundary run for %s (pid %d)" % (utc(pending), pid))


def retry_moment(config_path, environ, settings, now):
    """When to try a failed event again: the doors' next event, at the latest
    RETRY_SECONDS from NOW."""
    return int(min([next_event(now, *timing) for timing in
                    door_timings(config_path, environ, settings)] + [now + RETRY_SECONDS]))


def schedule_retry(config_path, environ, now, verbose):
    """After a failed scheduled run: a boundary run for retry_moment()."""
    try:
        settings = server_settings(environ)
        moment = retry_moment(config_path, environ, settings, now)
        with take_lock(settings["STATE_DIR"]):
            schedule_boundary_run(config_path, moment, now, settings, verbose)
    except RotatorError as exc:
        log("no retry scheduled: %s" % exc.what)


def tell_next_event(config_path, event, now, settings):
    """What a run by hand says instead of scheduling a boundary run."""
    if event is None or event > now + settings["SERVER_INTERVAL"] + TIMER_SLACK:
        return
    pid, pending = pending_boundary_pid(settings["STATE_DIR"])
    if pid and pending <= event:
        log("next event at %s: the timer's boundary run (pid %d) rotates then"
            % (utc(event), pid))
    else:
        log("next event at %s, before the timer's next run: the watch rotates then; in timer "
            "mode, `systemctl start knockd_rotator.service` schedules it" % utc(event))


def derive_keys(config_path, environ, moment):
    """Plan every file's rotation at MOMENT now, for its keys: a boundary run
    that sleeps until MOMENT then finds each PIN door's key (a PBKDF2) in
    KEY_CACHE, in memory only, and its rotation only computes sequences.
    Whatever fails here, the run at MOMENT meets and reports."""
    try:
        settings = server_settings(environ)
        settings_of = settings_reader(with_env_file(environ, settings["ENV_FILE"]))
        engines.chosen(settings).derive_keys(config_path, settings_of, moment)
    except RotatorError:
        pass


def sleep_until(moment):
    """Sleep until the wall clock reaches MOMENT, following clock changes."""
    while True:
        remaining = moment - time.time()
        if remaining <= 0:
            return
        time.sleep(min(remaining, 30))


def door_timings(config_path, environ, settings):
    """{(period, grace, lead)} of the engine's doors; empty when unknown."""
    try:
        environ = with_env_file(environ, settings["ENV_FILE"])
        return engines.chosen(settings).timings(config_path, environ)
    except RotatorError:
        return set()
