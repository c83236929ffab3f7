"""Watch mode: one process that rotates at every event and when the files change."""

import os
import select
import signal
import time

from knockd_rotator import engines
from knockd_rotator.core.errors import EXIT_OK
from knockd_rotator.core.files import log, utc
from knockd_rotator.core.generator import RotatorError
from knockd_rotator.core.settings import server_settings
from knockd_rotator.rotation import rotate_all
from knockd_rotator.scheduling import end_pending_boundary_run, retry_moment, RETRY_SECONDS


# A long-running mode for short periods: one process that rotates at every
# boundary and grace end and sleeps in between; a change of knockd.conf or of
# the environment file wakes it within WATCH_LOOK.  Each rotation takes the lock
# and rolls back like a one-off run; a failed one is logged and tried again
# at the next event (at the latest RETRY_SECONDS later).  SIGTERM or
# SIGINT during a rotation lets it finish first.  Under systemd, its state is
# the unit's status line (sd_notify STATUS=), and WATCH_FAILURES failed events
# in a row end the process with the last error's exit code, so that the unit
# shows the failure (and Restart= tries again) instead of a green `active`.

WATCH_LOOK = 1        # seconds between two looks at the files' modification times
# Seconds the wall clock may move apart from the monotonic one before the
# watch plans again: NTP slews by at most 0.5 ms a second, a step is larger.
CLOCK_SET = 1
WATCH_FAILURES = 3


def stop_signals():
    """Make SIGTERM and SIGINT only note themselves and wake pause_until().
    Returns (the wake-up descriptor, the list of signals received)."""
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    os.set_blocking(write_end, False)
    signal.set_wakeup_fd(write_end)
    received = []
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, lambda signum, frame: received.append(signum))
    return read_end, received


def modification_times(paths):
    times = []
    for path in paths:
        try:
            times.append(os.stat(path).st_mtime_ns)
        except OSError:
            times.append(None)
    return times


def pause_until(moment, wakeup, received, changed):
    """Sleep until the wall clock reaches MOMENT, a stop signal comes,
    CHANGED(), or the wall clock is set (it moves apart from the monotonic
    clock): a clock set back a day, say a wrong clock at boot put right,
    must not leave the doors on the wrong day's sequences until it has
    caught up with MOMENT."""
    offset = time.time() - time.monotonic()
    while not received and not changed():
        remaining = moment - time.time()
        if remaining <= 0 or abs(time.time() - time.monotonic() - offset) > CLOCK_SET:
            return
        # A second at a time: to follow changes of the wall clock, and to see
        # a door that add-client (or an editor) added, which may need an
        # event sooner than MOMENT.
        select.select([wakeup], [], [], min(remaining, WATCH_LOOK))
        try:
            os.read(wakeup, 512)
        except BlockingIOError:
            pass


def notify_systemd(environ, state):
    """Send STATE (e.g. `STATUS=...`) to the service manager, if there is one."""
    address = environ.get("NOTIFY_SOCKET")
    if not address:
        return
    import socket
    if address.startswith("@"):
        address = "\0" + address[1:]      # an abstract socket
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        try:
            notify.sendto(state.encode("utf-8", "replace"), address)
        except OSError:
            pass                          # the status line is a courtesy


def watch(config_path, environ, verbose):
    """Rotate at every event until a stop signal.  Returns an exit code."""
    settings = server_settings(environ)    # a bad setting ends the service now, not later
    wakeup, received = stop_signals()
    engine = engines.chosen(settings)

    def files():
        return [settings["ENV_FILE"]] + engine.files(config_path)
    end_pending_boundary_run(settings["STATE_DIR"])
    log("watching %s" % config_path)
    failures = 0
    while not received:
        now = time.time()
        # Read before the rotation: an edit made while it runs must wake us.
        seen = modification_times(files())
        try:
            # With no door, nothing is due: a change of the files wakes us.
            event = rotate_all(config_path, environ, now, verbose=verbose) or now + RETRY_SECONDS
            if engine.LOOK_SECONDS:
                event = min(event, now + engine.LOOK_SECONDS)
            failures = 0
            notify_systemd(environ, "STATUS=rotated at %s; next event at %s"
                           % (utc(now), utc(event)))
        except RotatorError as exc:
            # The rollback rewrote the file: that must not wake us at once,
            # or a failing reload would be hammered in a loop.
            seen = modification_times(files())
            failures += 1
            if failures >= WATCH_FAILURES:
                log("%s; %d failed events in a row: exiting" % (exc, failures))
                notify_systemd(environ, "STATUS=FAILING: %s" % exc)
                return exc.code
            event = retry_moment(config_path, environ, settings, now)
            log("%s; trying again at %s" % (exc, utc(event)))
            notify_systemd(environ, "STATUS=FAILING (%d in a row): %s; trying again at %s"
                           % (failures, exc, utc(event)))
        pause_until(event, wakeup, received, lambda: modification_times(files()) != seen)
    log("stopped by signal %d" % received[0])
    return EXIT_OK
