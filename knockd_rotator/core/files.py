"""Plumbing every part shares: atomic file replacement, state records, the lock, the state
folder's trust, processes by pid and start.
"""

import datetime
import fcntl
import os
import sys
import tempfile
import time

from knockd_rotator.core.errors import EXIT_BUSY, EXIT_CONFIG, EXIT_ENVIRONMENT
from knockd_rotator.core.generator import RotatorError


LOCK_TIMEOUT = 60        # seconds to wait for another run to finish

# Temp files are `.knockd.conf.XXXX.knockd_rotator.tmp` beside the file; a
# killed run may leave one, which the next run removes.
TEMP_SUFFIX = ".knockd_rotator.tmp"


def log(message):
    print("knockd_rotator: " + message, file=sys.stderr, flush=True)


def read_config(path):
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise RotatorError("cannot read %s: %s" % (path, exc.strerror),
                           "check the path given with --config", EXIT_CONFIG) from None


def replace_file(path, data, create=False):
    """Swap PATH's content for DATA atomically, keeping its mode and owner.
    With CREATE, a missing PATH is made root-only (0600), just as atomically."""
    try:
        _replace_file(path, data, create)
    except OSError as exc:
        raise RotatorError("cannot write %s: %s" % (path, exc.strerror or exc),
                           "run as root, with write access to its folder; nothing was "
                           "changed", EXIT_CONFIG) from None


def _replace_file(path, data, create):
    try:
        status = os.stat(path)
        mode, uid, gid = status.st_mode & 0o7777, status.st_uid, status.st_gid
    except FileNotFoundError:
        if not create:
            raise
        mode, uid, gid = 0o600, os.geteuid(), os.getegid()
    folder = os.path.dirname(path) or "."
    descriptor, temporary = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".",
                                             suffix=TEMP_SUFFIX, dir=folder)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            os.fchmod(handle.fileno(), mode)
            # Only when it differs: the units' seccomp filter (~@privileged)
            # refuses fchown() even when it would change nothing.
            made = os.fstat(handle.fileno())
            if (made.st_uid, made.st_gid) != (uid, gid):
                os.fchown(handle.fileno(), uid, gid)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise
    folder_descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(folder_descriptor)
    finally:
        os.close(folder_descriptor)


def remove_stale_temporaries(path):
    """Temp files a killed run left beside PATH (called under the lock)."""
    folder = os.path.dirname(path) or "."
    prefix = "." + os.path.basename(path) + "."
    for name in os.listdir(folder):
        if name.startswith(prefix) and name.endswith(TEMP_SUFFIX):
            os.unlink(os.path.join(folder, name))


def trust_state_dir(state_dir):
    """Make STATE_DIR if missing; refuse one that another user could have
    prepared.  Root writes its lock, its pending pid and the last good
    knockd.conf there: under a world-writable parent, a local user's folder
    (or a symlink named `lock` in it) would make root create files of that
    user's choosing, or hold the lock and stop every rotation."""
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    status = os.lstat(state_dir)
    import stat
    if not stat.S_ISDIR(status.st_mode) or status.st_uid != os.geteuid() \
            or status.st_mode & 0o022:
        raise RotatorError("the state folder %s is %s" % (
            state_dir, "not a folder" if not stat.S_ISDIR(status.st_mode) else
            "owned by uid %d" % status.st_uid if status.st_uid != os.geteuid() else
            "writable by others (mode %04o)" % (status.st_mode & 0o7777)),
                           "remove it, or set KNOCKD_ROTATOR_STATE_DIR to a folder of root's "
                           "own, mode 0700", EXIT_ENVIRONMENT)


def take_lock(state_dir, name="lock"):
    """An exclusive lock on STATE_DIR/NAME, held until the handle is closed."""
    try:
        trust_state_dir(state_dir)
        descriptor = os.open(os.path.join(state_dir, name),
                             os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
        handle = os.fdopen(descriptor, "a")
    except OSError as exc:
        raise RotatorError("cannot open the lock in %s: %s" % (state_dir, exc.strerror),
                           "run as root, or set KNOCKD_ROTATOR_STATE_DIR",
                           EXIT_ENVIRONMENT) from None
    deadline = time.monotonic() + LOCK_TIMEOUT
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return handle
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise RotatorError("another knockd_rotator_server run has held %s/%s for "
                                   "%d s" % (state_dir, name, LOCK_TIMEOUT),
                                   "see what it waits for: fuser -v %s/%s" % (state_dir, name),
                                   EXIT_BUSY) from None
            time.sleep(0.05)


def keep_state(path, data):
    """Make the state file PATH hold DATA; most runs change nothing, and write nothing."""
    try:
        with open(path, "rb") as handle:
            if handle.read() == data:
                return
    except OSError:
        pass
    replace_file(path, data, create=True)


def readable_by_others(path, what="the secret"):
    """A warning when PATH (holding WHAT) is readable by others, else None.
    knockd.conf holds the live sequences: Debian ships it 0644, and a local
    user who reads it can open the doors from another address."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if mode & 0o077:
        return ("warning: %s is mode %04o: others can read %s (%s)"
                % (path, mode & 0o7777, what, private_fix(path)))
    return None


def private_fix(path):
    """The command that leaves PATH to its owner.  With an ACL (a group mode
    of r is then the ACL's mask, e.g. after `setfacl -m u:nagios:r`), chmod
    alone would only mask its entries until the next chmod g+r."""
    try:
        acl = "system.posix_acl_access" in os.listxattr(path)
    except OSError:
        acl = False
    return ("setfacl -b %s; " % path if acl else "") + "chmod 600 %s" % path


def warn_if_readable_by_others(config_path, env_file):
    """Log what others can read: CONFIG_PATH, and ENV_FILE unless None."""
    for warning in (env_file and readable_by_others(env_file),
                    readable_by_others(config_path, "the live sequences")):
        if warning:
            log(warning)


# The timer runs knockd_rotator.service every SERVER_INTERVAL.  When the next
# event (a period boundary, or the end of a grace) comes before the next timer
# run, the service's run (`--schedule`) leaves one detached process
# (`--at EVENT`) that sleeps until that second and runs again; it then
# schedules the event after it.  The unit's KillMode=process lets it outlive
# the oneshot, inside the unit's cgroup and sandbox, where `systemctl kill` and
# the watch find it.  Only the unit's runs schedule: a run by hand (or
# add-client) would leave an unsandboxed process in the admin's session that
# nothing stops, holding the caller's terminal or pipe; it says what comes
# next instead.  The child inherits the environment, so the secret never
# travels on a command line.  STATE_DIR/pending holds its pid and start time:
# at most one is pending.  A failed scheduled run schedules a retry
# (RETRY_SECONDS).

def process_start(pid):
    """PID's start time (clock ticks after boot, field 22 of /proc/PID/stat),
    or None when there is no such process.  With the pid it names one process
    for good: a local user who cycles pids until one of his takes over a
    recorded pid gets that pid with a later start."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as handle:
            stat = handle.read()
        # The command name (field 2) is in parentheses and may hold any byte.
        return int(stat[stat.rindex(b")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def utc(timestamp):
    return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc) \
        .strftime("%Y-%m-%d %H:%M:%S UTC")
