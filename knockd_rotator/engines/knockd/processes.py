"""The knockd processes that read a file: found in /proc, listening or compiling their filter."""

import os
import time


# The file each knockd process reads, by (pid, start time), for one run:
# with 50 knockd, finding each one's file again (its arguments, its folder,
# the real path) made every look at /proc cost 4.6 ms instead of 1.1 ms, and
# a reload looks several times.  rotate_all() starts afresh.
KNOCKD_CONFIGS = {}


def knockd_config(entry):
    """The real path of the file knockd process ENTRY (a /proc name) reads:
    its -c, else /etc/knockd.conf."""
    with open("/proc/%s/cmdline" % entry, "rb") as handle:
        argv = handle.read().split(b"\0")
    config = "/etc/knockd.conf"
    for index, word in enumerate(argv[:-1]):      # the last one given wins
        if word in (b"-c", b"--config"):
            config = os.fsdecode(argv[index + 1])
    if not os.path.isabs(config):
        # Only root reads another user's cwd: a monitoring account finds
        # the knockd of an absolute -c (as the units give) without it.
        config = os.path.join(os.readlink("/proc/%s/cwd" % entry), config)
    return os.path.realpath(config)


def knockd_processes(config_path):
    """{pid: (parent pid, state, CPU clock ticks used)} of the knockd
    processes that read CONFIG_PATH, as far as /proc shows them."""
    wanted = os.path.realpath(config_path)
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if proc_file("/proc/%s/comm" % entry) != b"knockd\n":
                continue
            # stat(5) after the name: state, ppid, ... utime and stime
            # (fields 14, 15), ... start time (22).
            fields = proc_file("/proc/%s/stat" % entry).rsplit(b")", 1)[1].split()
            known = (entry, fields[19])
            if known not in KNOCKD_CONFIGS:
                KNOCKD_CONFIGS[known] = knockd_config(entry)
        except OSError:
            continue                               # gone meanwhile, or not ours to read
        if KNOCKD_CONFIGS[known] == wanted:
            found[int(entry)] = (int(fields[1]), fields[0].decode(),
                                 int(fields[11]) + int(fields[12]))
    return found


def proc_file(path):
    """The bytes of a small /proc file (without the cost of a Python file object)."""
    descriptor = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(descriptor, 4096)
    finally:
        os.close(descriptor)


def compiled(found):
    """Whether no knockd of FOUND (knockd_processes) runs on a CPU: its
    filter is compiled (a knockd this process cannot see counts as done)."""
    return all(found[pid][1] != "R" for pid in main_knockd(found))


def main_knockd(found):
    """The pids of FOUND (knockd_processes) that are no other one's child:
    knockd's children wait to run a stop_command and hear nothing."""
    return [pid for pid, (parent, _, _) in found.items() if parent not in found]


def knockd_listening(config_path, found=None):
    """(True, ""), (False, why) or (None, why) for the knockd that reads
    CONFIG_PATH: a process can be active for systemd and hear nothing,
    stopped or without its packet capture socket.  None when no such
    process is to be seen here (another PID namespace): then CHECK_COMMAND
    alone speaks for knockd.  FOUND: knockd_processes(CONFIG_PATH), if at hand."""
    found = knockd_processes(config_path) if found is None else found
    main = main_knockd(found)
    if not main:
        return None, "no knockd process reading %s is visible" % config_path
    unseen = None
    for pid in main:
        if found[pid][1] in "TtZX":
            return False, "knockd (pid %d) is stopped" % pid
        try:
            sockets = {os.readlink("/proc/%d/fd/%s" % (pid, fd))
                       for fd in os.listdir("/proc/%d/fd" % pid)}
            with open("/proc/%d/net/packet" % pid) as handle:
                captures = {"socket:[%s]" % row.split()[-1] for row in handle.readlines()[1:]}
        except OSError:
            unseen = pid           # gone meanwhile, or its descriptors are root's to see
            continue
        if not sockets & captures:
            return False, "knockd (pid %d) has no packet capture open: it hears no knock" % pid
    if unseen is not None:
        return None, ("knockd (pid %d) runs, but its descriptors are not to be seen here: "
                      "status as root checks its packet capture" % unseen)
    return True, ""


# knockd reloads inside its SIGHUP handler, compiling one capture filter for
# all its doors (2.5 s for 200 doors of 10 ports), and a SIGHUP that comes
# meanwhile waits for the one before: a knockd that has not re-read its file
# yet but keeps using CPU is busy, not hung (hung, it used none).  It is given
# this long, as long as it keeps using CPU, before it is taken for hung.
BUSY_PATIENCE = 30
BUSY_LOOK = 0.5          # seconds between two looks at its CPU time


def rereads_while_busy(config_path, opens):
    """Wait while the knockd reading CONFIG_PATH keeps using CPU, at most
    BUSY_PATIENCE seconds, for OPENS (a FileOpens) to see it re-read the
    file: whether it did."""
    def used():
        found = knockd_processes(config_path)
        main = main_knockd(found)
        return sum(found[pid][2] for pid in main) if main else None
    deadline, before = time.monotonic() + BUSY_PATIENCE, used()
    while before is not None and time.monotonic() < deadline:
        time.sleep(BUSY_LOOK)
        if opens.seen(True):
            return True
        now = used()
        if now is None or now <= before:
            return False
        before = now
    return opens.seen(True)
