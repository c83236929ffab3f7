"""Loading a file into knockd: reload, evidence that it took (FileOpens, knockd_stays_up), putting
the last good file back, the loaded record.
"""

import hashlib
import os
import select
import threading
import time

from knockd_rotator.core.commands import run_command
from knockd_rotator.core.errors import EXIT_FAILED, EXIT_RECOVERY
from knockd_rotator.core.files import keep_state, log, replace_file
from knockd_rotator.core.generator import RotatorError
from knockd_rotator.engines.knockd.processes import (
    BUSY_PATIENCE, compiled, knockd_listening, knockd_processes, rereads_while_busy)


CHECK_POLL = 0.05        # seconds between two runs of the check command
# After knockd has re-read its file, this long alive is enough: a file it
# refuses makes it exit at once.
RELOAD_SETTLE = 0.2


def knockd_stays_up(settings, opens=None, slot=None, started=None):
    """Poll the check command for CHECK_SECONDS: (all passed, detail of a failure).
    With OPENS (a FileOpens), evidence ends it sooner: knockd (re-)read the
    file and still runs RELOAD_SETTLE seconds later; with STARTED (the path
    of the file a knockd was just started on), it must listen by then too
    (knockd_started).  A burn must not hold the lock for whole seconds: the
    next opening's burn waits for it, and its replay window with it.  SLOT (a
    ReloadSlot) goes back once knockd has re-read the file and compiled its
    filter."""
    deadline = time.monotonic() + settings["CHECK_SECONDS"]
    evidence = None       # when knockd was seen to read its file
    while True:
        ok, detail = run_command(settings["CHECK_COMMAND"])
        if not ok:
            return False, "check command failed (%s)" % detail
        now = time.monotonic()
        if slot is not None and evidence is not None:
            slot.release_when_compiled()
        if now >= deadline or evidence is not None and now - evidence >= RELOAD_SETTLE and (
                started is None or knockd_started(started)):
            return True, ""
        if evidence is None and opens is not None:
            # An open wakes this wait at once.
            if opens.seen(True, wait=CHECK_POLL):
                evidence = time.monotonic()
        elif evidence is not None and now - evidence < RELOAD_SETTLE:
            # The last check comes as the settling ends, not up to a poll later.
            time.sleep(min(CHECK_POLL, evidence + RELOAD_SETTLE - now))
        else:
            time.sleep(CHECK_POLL)


# knockd compiles its capture filter inside its SIGHUP handler, on one CPU,
# and hears nothing meanwhile.  Reloads that share a CPU stay deaf longer (500
# doors on 2 CPUs: 2 at a time, 173 ms at worst; 4, 273 ms), so a reload takes
# one of these slots, and gives it back once knockd has re-read its file and
# is no longer running on a CPU.  rotate_all's threads wait in parallel for
# everything else (the check, the settle, the state files).
RELOAD_SLOTS = threading.BoundedSemaphore(os.cpu_count() or 1)


class ReloadSlot:
    """One of RELOAD_SLOTS, for the reload of the knockd that reads PATH."""

    def __init__(self, path):
        self.path = path
        RELOAD_SLOTS.acquire()
        self.held = True

    def release(self):
        if self.held:
            self.held = False
            RELOAD_SLOTS.release()

    def release_when_compiled(self):
        """Release, unless the knockd reading PATH is still running on a CPU
        (a knockd this process cannot see counts as done)."""
        if self.held and compiled(knockd_processes(self.path)):
            self.release()


def knockd_runs(settings):
    return run_command(settings["CHECK_COMMAND"])[0]


IN_OPEN = 0x20     # inotify(7): the watched file was opened


class FileOpens:
    """Whether any process opened PATH since (inotify IN_OPEN on its inode,
    whatever mount namespace the opener is in): after a SIGHUP, the evidence
    that knockd re-read its file.  Where inotify is not to be had, it claims
    every open it cannot see, and the process check alone decides."""

    def __init__(self, path):
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        self.descriptor = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.descriptor >= 0 and libc.inotify_add_watch(
                self.descriptor, os.fsencode(path), IN_OPEN) < 0:
            os.close(self.descriptor)
            self.descriptor = -1

    def seen(self, evidence_only=False, wait=0):
        """True once PATH was opened, waiting WAIT seconds at most for it;
        where inotify is missing, True unless EVIDENCE_ONLY (nothing was
        seen, so nothing proves it)."""
        if self.descriptor < 0:
            time.sleep(wait)
            return not evidence_only
        return bool(select.select([self.descriptor], [], [], wait)[0])

    def close(self):
        if self.descriptor >= 0:
            os.close(self.descriptor)


def knockd_started(config_path):
    """True once the knockd reading CONFIG_PATH has its packet capture open
    (knockd opens it after it has taken its file) and has compiled its
    filter (it no longer runs on a CPU)."""
    found = knockd_processes(config_path)
    return knockd_listening(config_path, found)[0] is True and compiled(found)


def start_knockd(path, settings):
    """Start knockd with the file on disk at PATH: (stays up, detail of a failure).
    A knockd that read the file, lives RELOAD_SETTLE seconds on and listens
    has taken it (a new knockd for a new client need not wait CHECK_SECONDS)."""
    opens = FileOpens(path)
    try:
        ok, detail = run_command(settings["RECOVER_COMMAND"])
        if not ok:
            return False, "recover command failed (%s)" % detail
        return knockd_stays_up(settings, opens, started=path)
    finally:
        opens.close()


def load_into_knockd(path, new_data, fallback, was_running, settings):
    """Make knockd run with NEW_DATA, which is at PATH already.

    Decide on the evidence.  A knockd that dies after a reload was not
    necessarily killed by the new file: knockd 0.8 frees its doors inside its
    SIGHUP handler and crashes when a door's first port is flooded.  Putting
    the previous file back then would hand an attacker a veto over every
    rotation and revocation.  So a dead knockd is started with the new file
    first (which passed the grammar and file checks); only when knockd
    refuses to start with it does FALLBACK() (the last file knockd ran with,
    at the current sequences) go back.  Returns a warning to log, or None."""
    if was_running:
        ok, hung, detail = reload_with_evidence(path, settings)
        if ok and not hung:
            remember_good(settings["STATE_DIR"], new_data)
            remember_loaded(settings["STATE_DIR"], new_data)
            return None
        why = after_failed_reload(path, detail, hung, fallback, settings)
    else:
        # First install: knockd refuses to start while a door has no sequence.
        why = "knockd was not running"
        log("knockd is not running: starting it with the new file")
    return start_or_fall_back(path, new_data, why, was_running, fallback, settings)


def reload_with_evidence(path, settings):
    """Reload knockd and watch it re-read PATH: (alive, hung, detail).  Hung:
    alive, but it was not seen to re-read the file, nor kept busy with an
    earlier reload."""
    opens, hung, slot = FileOpens(path), False, ReloadSlot(path)
    try:
        ok, detail = run_command(settings["RELOAD_COMMAND"])
        if not ok:
            detail = "reload command failed (%s)" % detail
        else:
            ok, detail = knockd_stays_up(settings, opens, slot)
            if ok and not opens.seen() and rereads_while_busy(path, opens):
                ok, detail = knockd_stays_up(settings, opens)   # and lives on
            hung = ok and not opens.seen()
    finally:
        slot.release()
        opens.close()
    return ok, hung, detail


def after_failed_reload(path, detail, hung, fallback, settings):
    """After a reload that knockd did not take (DETAIL): a hung knockd is
    killed, one that lives on with its old doors gets FALLBACK() back (and
    the run fails).  Returns why knockd must be started."""
    if hung:
        # Alive, but deaf: knockd 0.8 can deadlock in its SIGHUP handler
        # under a flood, and a check of the process cannot see it.
        detail = ("knockd did not re-read the file within %d s of the reload, nor while "
                  "it kept using CPU (at most %d s): it hangs"
                  % (settings["CHECK_SECONDS"], BUSY_PATIENCE))
        killed, kill_detail = run_command(settings["KILL_COMMAND"])
        if not killed:
            raise RotatorError("%s, and the kill command failed (%s)" % (detail, kill_detail),
                               "kill knockd and start it now: systemctl kill --signal=KILL "
                               "{0}; systemctl start {0}".format(settings["UNIT"]),
                               EXIT_RECOVERY)
        return "knockd hung after the reload and was killed (%s)" % detail
    if knockd_runs(settings):
        # knockd lives, with the old doors in memory: the file must match
        # their shape.  Its sequences may be the current ones, which knockd
        # has not loaded: the record of what it loaded makes the next run
        # reload it.
        put_back(path, fallback(), detail, settings)
        raise RotatorError("knockd did not take the new %s (%s); the last file it ran "
                           "with is back, at the current sequences, and knockd runs "
                           "with the older one it had: the next run reloads it"
                           % (path, detail),
                           "check KNOCKD_ROTATOR_RELOAD_COMMAND and _CHECK_COMMAND; "
                           "journalctl -u %s" % settings["UNIT"], EXIT_FAILED)
    return "knockd died after the reload (%s)" % detail


def start_or_fall_back(path, new_data, why, was_running, fallback, settings):
    """Start knockd (not running: WHY) with NEW_DATA; when it refuses, put
    FALLBACK() back, start knockd with that, and fail.  A warning, or None."""
    state_dir = settings["STATE_DIR"]
    ok, detail = start_knockd(path, settings)
    if ok:
        remember_good(state_dir, new_data)
        remember_loaded(state_dir, new_data)
        return (("%s; it runs with the new file: knockd 0.8 can crash or hang while it reloads "
                 "under a flood of knocks, see journalctl -u %s" % (why, settings["UNIT"]))
                if was_running else None)
    good = fallback()
    put_back(path, good, "%s and refused to start with the new file (%s)"
             % (why, detail), settings)
    recovered, recover_detail = start_knockd(path, settings)
    if not recovered:
        raise RotatorError("%s, and it starts neither with the new %s (%s) nor with the "
                           "last file it ran with, now back in place (%s)"
                           % (why, path, detail, recover_detail),
                           "start knockd now: systemctl start {0}; journalctl -u {0}"
                           .format(settings["UNIT"]), EXIT_RECOVERY)
    remember_loaded(state_dir, good)
    raise RotatorError("%s and refused to start with the new %s (%s); the last file it ran "
                       "with is back and knockd runs with it" % (why, path, detail),
                       "knockd_rotator_server.py check; journalctl -u %s" % settings["UNIT"],
                       EXIT_FAILED)


def put_back(path, data, detail, settings):
    try:
        replace_file(path, data)
    except RotatorError as exc:
        raise RotatorError("%s, and putting the last good %s back failed: %s"
                           % (detail, path, exc.what),
                           "restore it by hand and reload knockd now", EXIT_RECOVERY) from None


# The last knockd.conf that knockd ran with, kept (0600) to roll back to.
LAST_GOOD = "last-good"


def remember_good(state_dir, data):
    keep_state(os.path.join(state_dir, LAST_GOOD), data)


# What knockd has in memory is not what the file holds when a reload failed
# with knockd alive, or the run died between the write and the SIGHUP: the
# file is current, yet knockd opens for the old sequences until something
# changes.  So the SHA-256 of the bytes knockd was seen to (re)read is kept,
# written only on that evidence, and a file ahead of it is loaded again.  It
# holds no sequence, so `status` without the secret may read it.
LOADED = "loaded"


def file_digest(data):
    return hashlib.sha256(data).hexdigest()


def remember_loaded(state_dir, data):
    keep_state(os.path.join(state_dir, LOADED), file_digest(data).encode() + b"\n")


def loaded_digest(state_dir):
    """The SHA-256 of the file knockd last re-read, or None when unknown."""
    try:
        with open(os.path.join(state_dir, LOADED), "rb") as handle:
            return handle.read().decode("ascii", "replace").strip() or None
    except OSError:
        return None


def last_good(state_dir):
    try:
        with open(os.path.join(state_dir, LAST_GOOD), "rb") as handle:
            return handle.read()
    except OSError:
        return None


def heal_knockd(config_path, settings, data):
    """A current file (DATA) does not prove knockd runs: start it if it does not."""
    if knockd_runs(settings):
        return
    why = "knockd is not running, although %s is current" % config_path
    log(why + ": starting it")
    ok, detail = start_knockd(config_path, settings)
    if not ok:
        raise RotatorError("%s, and starting it failed (%s)" % (why, detail),
                           "start knockd now: systemctl start {0}; "
                           "journalctl -u {0}".format(settings["UNIT"]), EXIT_RECOVERY)
    remember_loaded(settings["STATE_DIR"], data)
