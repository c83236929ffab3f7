"""one_time_sequences files: the keeper line that keeps knockd from stopping when they are used
up, and what knockd needs on disk.
"""

import os

from knockd_rotator.core.errors import EXIT_CONFIG
from knockd_rotator.core.files import log
from knockd_rotator.core.generator import (
    _is_monotonic, format_sequence, MAX_LENGTH, MAX_PORT, MIN_LENGTH, MIN_PORT, RotatorError)
from knockd_rotator.engines.knockd.config import SPACE


# knockd 0.8 disables a door when it has used the last line of its
# one_time_sequences file, and exits at the next reload: it refuses a used-up
# file.  One door running dry would shut every door, the rotator's too.  So
# each rotation makes the last live line of every such file a keeper: a
# random sequence nobody knows, under KEEPER_MARK.  Once the user's lines are
# used up knockd waits on the keeper and takes reloads; the door opens for nobody
# until lines are added.  A keeper that lines were added after is struck out
# as knockd strikes a used line (one '#' over its first byte, in place: knockd
# holds the file open and writes into it, so it is never replaced), and a new
# keeper is appended.  A keeper has as many ports as the line before it: when
# knockd 0.8 moves on to a longer line, it stops hearing other doors (seen
# with 3 then 4 ports).
KEEPER_MARK = (b"# knockd_rotator keeper: the next line is a sequence nobody knows, so that "
               b"knockd does not stop when the lines above are used up (add new lines at the "
               b"end: the next rotation moves this)")


class OneTimeFile:
    """What matters in a one_time_sequences file's DATA: .unused (the user's
    unused lines), .keepers (offsets of live keepers), .kept (a single keeper
    is the last live line), .last_ports (ports of the last used or unused
    line of the user's), .longer (1-based line numbers of unused lines longer
    than the live line before them)."""

    def __init__(self, data):
        self.data = data
        self.unused, self.keepers, self.longer, self.last_ports = 0, [], [], None
        keeper_last, live_ports, marked, offset = False, None, False, 0
        for number, raw in enumerate(data.split(b"\n"), 1):   # knockd reads with fgets
            text = raw.strip(SPACE)
            ports = text.count(b",") + 1
            if text[:1] not in (b"", b"#"):
                if marked:
                    self.keepers.append(offset)
                else:
                    self.unused += 1
                    self.last_ports = ports
                    if live_ports is not None and ports > live_ports:
                        self.longer.append(number)
                    live_ports = ports
                keeper_last = marked
            elif text[1:2].isdigit() and not marked:      # a line knockd has used
                self.last_ports = ports
            marked = text == KEEPER_MARK
            offset += len(raw) + 1
        self.kept = keeper_last and len(self.keepers) == 1


def one_time_supplies(lines):
    """(line, path, OneTimeFile or the OSError that reading it gave) for
    each one_time_sequences file of LINES."""
    supplies = []
    for line in lines:
        if (line.kind == "directive" and line.value and line.key == "ONE_TIME_SEQUENCES"
                and line.section != b"options"):
            path = line.value.decode("utf-8", "surrogateescape")
            try:
                with open(path, "rb") as handle:
                    supplies.append((line, path, OneTimeFile(handle.read())))
            except OSError as exc:
                supplies.append((line, path, exc))
    return supplies


def keep_one_time_sequences(lines):
    """Give every one_time_sequences file of LINES a keeper as its last live
    line (see KEEPER_MARK).  Returns whether a keeper knockd may be waiting
    on was struck out: knockd must then re-read the file to reach the lines
    after it.  Raises RotatorError when a file cannot be written."""
    import secrets
    draw, struck = secrets.SystemRandom(), False
    for line, path, supply in one_time_supplies(lines):
        if isinstance(supply, OSError) or supply.kept:
            continue
        length = min(supply.last_ports or MIN_LENGTH, MAX_LENGTH)
        while True:    # distinct ports, in an order a scan up or down does not walk
            keeper = draw.sample(range(MIN_PORT, MAX_PORT + 1), length)
            if length < 3 or not _is_monotonic(keeper):
                break
        try:
            with open(path, "r+b") as handle:
                data = handle.read()
                for offset in OneTimeFile(data).keepers:
                    handle.seek(offset)
                    handle.write(b"#")
                handle.seek(0, os.SEEK_END)
                handle.write((b"\n" if data and not data.endswith(b"\n") else b"")
                             + KEEPER_MARK + b"\n" + format_sequence(
                                 [(port, "tcp") for port in keeper]).encode() + b"\n")
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as exc:
            raise RotatorError("cannot add a keeper line to the one_time_sequences file %s "
                               "(line %d): %s" % (path, line.number, exc.strerror),
                               "make it writable for root, or remove the door",
                               EXIT_CONFIG) from None
        struck = struck or bool(supply.keepers)
        log("%s: %s a keeper line (knockd 0.8 stops when the lines are used up)"
            % (path, "moved" if supply.keepers else "added"))
    return struck


def file_errors(lines):
    """What knockd needs on disk besides knockd.conf and refuses, or dies of,
    when it is not there: (line, what, fix) tuples.  A reload of such a file
    kills knockd, and no grammar can see it.  A one_time_sequences file that
    a rotation can give a keeper is not among them."""
    errors = []
    for line, path, supply in one_time_supplies(lines):
        if isinstance(supply, OSError):
            errors.append((line.number, "one_time_sequences file %s: %s; knockd refuses "
                           "the whole file and exits" % (path, supply.strerror),
                           "create it, one sequence a line, or remove the line"))
        elif not supply.kept and not os.access(path, os.W_OK):
            errors.append((line.number, "one_time_sequences file %s cannot be given a keeper "
                           "line (not writable): knockd 0.8 stops when its lines are used up"
                           % path, "make it writable for root"))
    for line in lines:
        if line.kind != "directive" or not line.value:
            continue
        path = line.value.decode("utf-8", "surrogateescape")
        if line.section == b"options" and line.key in ("LOGFILE", "PIDFILE"):
            folder = os.path.dirname(path) or "."
            if not os.path.isdir(folder):
                errors.append((line.number, "the folder of %s %s does not exist: knockd "
                               "cannot start" % (line.key.lower(), path),
                               "create %s, or change the path" % folder))
    return errors
