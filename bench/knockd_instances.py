#!/usr/bin/env python3
"""Benchmark: many client doors spread over several knockd, as add-client
places them, through a rotation, its grace end and a burn.

The goal: 500 client doors on one server, no door deaf for more than 0.2 s
at a rotation or a burn, knockd's total peak memory under 200 MB, and a cost
per door that stays flat from 10 to 500 doors.

In a network namespace of its own (loopback only), for each total door count
N (--doors, default 10,50,100,200,500), with K doors per knockd
(--per-knockd, default add-client's KNOCKD_ROTATOR_DOORS_PER_KNOCKD, 12):

  layout     N rotator doors `cNNN_ssh_ROTATOR`, as add-client writes them
             but with `true` for their firewall commands (nobody knocks
             them), each with its own secret (KNOCKD_ROTATOR_SECRET_CNNN_SSH)
             and single-use (KNOCKD_ROTATOR_SINGLE_USE=1, add-client's
             default): the first K in knockd.conf, the next K in
             knockd_rotator.d/1.conf, and so on, the last file holding the
             rest.  The files hold no sequence yet.  Each file also holds one
             static door, `probe` (10 TCP ports of its own, `command = true`),
             which this script knocks: K + 1 doors per knockd, 2K + 1 during
             a grace window.  Each file has a log file of its own.
  start      one run of `knockd_rotator_server.py --config knockd.conf`
             (outside a grace window) writes the sequences and starts each
             knockd through its recover command: `knockd -d -i lo` (with
             --ipv4-only: `knockd -4 -d -i lo`) with
             MALLOC_MMAP_THRESHOLD_=131072 MALLOC_TRIM_THRESHOLD_=131072 in
             its environment, as the units start it.  Each knockd's reload
             command is `kill -HUP` of its pid, between two `date +%s.%N`
             written to a file of its own: the moments of its SIGHUP.
             Period --period (default 20 s), grace --grace (default 5 s).
  events     `burn` of one door of the last file, as its start_command runs
             it after an opening: one file changes, one knockd reloads (at
             rest, outside a grace window; an untimed run first if a boundary
             passed since the start).  Then, at the next boundary, one server
             run (the timer's boundary run) gives every door its grace
             sibling: every knockd reloads with 2K + 1 doors.  At the grace
             end (or once the boundary's reloads are measured, if later: the
             table says how late) one more run takes the siblings away, and
             every knockd reloads again.
  server     the wall time of each server run (spawn to exit; it reloads up
             to os.cpu_count() knockd at once and waits for each to re-read
             its file and live 0.2 s on); "last SIGHUP" is how long after the
             event moment (for the burn: the spawn) the last knockd got its
             SIGHUP: until then its doors hold the old sequences.
  deafness   of each knockd that got a SIGHUP: from the `date` before its
             SIGHUP until its log (polled every 2 ms) shows `probe: OPEN
             SESAME` for a knock sent after the SIGHUP.  From the moment its
             SIGHUP is seen, its probe door is knocked every 20 ms (a SYN
             per port: a non-blocking connect from Python), each attempt from
             a source address of its own (127.x.y.z), until one opened; 1 s
             later every attempt sent is looked up in the log: "probes
             opened" counts those that opened, and a note says when each
             other one was sent.  Median and max over the knockd that
             reloaded.  It includes knockd's 50 ms read batch: a knock with
             no reload takes 47 to 51 ms the same way.
  memory     the sum over all knockd (their main processes) of PSS (shared
             pages divided among the processes that map them, from
             /proc/PID/smaps_rollup) and of VmRSS, at rest (no knockd used
             CPU for 0.2 s) after the start and after the grace end; every 10
             ms during each event, the sums of VmRSS and of private RSS
             (/proc/PID/statm: resident less file-backed pages, which all
             knockd share): the largest sums seen; and, after the events, the
             sum of each knockd's VmHWM (its own peak, whenever it was: a
             bound that is only reached if every knockd peaks at once).
  CPU        user + system time all knockd used during the event, and that
             per door.

An event not measured within --cap seconds (default 60) ends that door
count; after a failure (a knockd died or never opened, a server run failed)
the larger counts are skipped.  It prints two tables (events; memory), the
failed probe attempts and the command to reproduce them.  Needs root, ip
and knockd (tests/run installs them):

    /usr/bin/python3 bench/knockd_instances.py [--doors 10,50,100,200,500] [--per-knockd 12]
        [--period 20] [--grace 5] [--cap 60] [--no-trial] [--ipv4-only]
"""

import argparse
import os
import random
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from knock_latency import INSIDE, SERVER, in_own_namespace, need_root_and  # noqa: E402
from knockd_scale import MALLOC_ASSIGNMENTS, sequences  # noqa: E402

sys.path.insert(0, str(SERVER.parent))
from knockd_rotator.core import settings as core_settings  # noqa: E402

INTERVAL = 0.020          # one probe attempt per knockd that is reloading, every 20 ms
POLL = 0.002              # how often the SIGHUP files and the logs are read
SAMPLE = 0.010            # how often the knockd's RSS is summed
LATE = 1.0                # how long after an event's last opening attempts may still open
PROBE_PORTS = 10
PAGE = os.sysconf("SC_PAGE_SIZE")
TICKS = os.sysconf("SC_CLK_TCK")
# add-client's door, less the firewall (see concurrent_knockers.FILLER).
DOOR = """
[{name}_ROTATOR]
\tseq_timeout   = 15
\ttcpflags      = syn
\tstart_command = true
\tcmd_timeout   = 30
\tstop_command  = true
"""
PROBE = """
[probe]
\tsequence    = {ports}
\tseq_timeout = 5
\ttcpflags    = syn
\tcommand     = true
"""


class Knockd:
    """One knockd: its file, pid file, SIGHUP file, log and probe door."""

    def __init__(self, folder, number, path, probe):
        self.number, self.path, self.probe = number, path, probe
        self.pidfile = folder / ("knockd-%d.pid" % number)
        self.hups = folder / ("hup-%d" % number)
        self.log = folder / ("knockd-%d.log" % number)

    def pid(self):
        try:
            return int(self.pidfile.read_text())
        except (OSError, ValueError):
            return None


def size(path):
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def lay_out(folder, doors, per_knockd, rng):
    """Write knockd.conf and the instances' files as add-client fills them;
    the Knockd of each file, and the door names."""
    names = ["c%03d_ssh" % number for number in range(doors)]
    groups = [names[i:i + per_knockd] for i in range(0, doors, per_knockd)]
    instances = folder / "knockd_rotator.d"
    if len(groups) > 1:
        instances.mkdir(mode=0o700)
    knockds = []
    for number, (group, probe) in enumerate(zip(groups, sequences(len(groups), PROBE_PORTS, rng))):
        path = folder / "knockd.conf" if number == 0 else instances / ("%d.conf" % number)
        knockd = Knockd(folder, number, path, probe)
        text = "[options]\n\tlogfile = %s\n" % knockd.log
        text += PROBE.format(ports=",".join(map(str, probe)))
        text += "".join(DOOR.format(name=name) for name in group)
        path.touch(mode=0o600)      # live sequences: the server warns of a readable file
        path.write_text(text)
        knockd.log.write_text("")
        knockds.append(knockd)
    return knockds, names


def commands(folder, config, flags):
    """The server's command settings for knockd.conf's knockd (instance 0,
    `{n}` = 0) and, with `{n}` = %i, the instances'; FLAGS: knockd's options."""
    pidfile, hups = str(folder) + "/knockd-{n}.pid", str(folder) + "/hup-{n}"
    hup = ('p=$(cat {pid}) && t=$(date +%s.%N) && kill -HUP "$p" && '
           'echo "$t $(date +%s.%N)" >> {hups}')
    start = ("rm -f {pid}; env %s knockd %s-d -i lo -c {conf} -p {pid} && i=0; "
             "while [ ! -s {pid} ] && [ $i -lt 500 ]; do sleep 0.01; i=$((i+1)); done"
             % (MALLOC_ASSIGNMENTS, "".join(flag + " " for flag in flags)))
    templates = {
        "RELOAD_COMMAND": hup,
        "CHECK_COMMAND": "ps -o stat= -p $(cat {pid}) | grep -qv Z",
        # Starts knockd when it is not running, reloads it when it is.
        "RECOVER_COMMAND": "if kill -0 $(cat {pid}) 2>/dev/null; then %s; else %s; fi"
                           % (hup, start),
        "KILL_COMMAND": "kill -KILL $(cat {pid})",
    }
    settings = {}
    for name, template in templates.items():
        for prefix, number, conf in (("", "0", config),
                                     ("INSTANCE_", "%i", folder / "knockd_rotator.d/%i.conf")):
            settings[prefix + name] = template.format(
                pid=pidfile.format(n=number), hups=hups.format(n=number), conf=conf)
    return settings


def server_env(folder, names, per_knockd, period, grace, trial, flags):
    env = {k: v for k, v in os.environ.items() if not k.startswith("KNOCKD_ROTATOR_")}
    settings = dict(commands(folder, folder / "knockd.conf", flags),
                    STATE_DIR=folder / "state", ENV_FILE=folder / "absent.env",
                    PERIOD_MODULO=period, GRACE=grace, SINGLE_USE=1, CHECK_SECONDS=1,
                    DOORS_PER_KNOCKD=per_knockd,
                    # The boundary's run is the event measured.  With the
                    # server's lead it comes LEAD seconds earlier, with a file
                    # of the same shape (the next sequences, the current ones
                    # as siblings), so its reloads cost the same.
                    LEAD=0)
    if not trial:
        settings["TRIAL_KNOCKD"] = ""
    settings.update({"SECRET_" + name.upper(): secrets.token_urlsafe(32) for name in names})
    env.update({"KNOCKD_ROTATOR_" + name: str(value) for name, value in settings.items()})
    return env


def new_lines(path, offset):
    """The whole lines PATH has beyond OFFSET, and the offset after them."""
    if size(path) <= offset:
        return "", offset
    with open(path, "rb") as handle:
        handle.seek(offset)
        data = handle.read()
    data = data[:data.rfind(b"\n") + 1]
    return data.decode("utf-8", "replace"), offset + len(data)


def statm(pid):
    """PID's resident bytes, and those of them not backed by a file (its
    own: the libraries' pages are counted in the RSS of every knockd)."""
    with open("/proc/%d/statm" % pid) as handle:
        fields = handle.read().split()
    return int(fields[1]) * PAGE, (int(fields[1]) - int(fields[2])) * PAGE


def cpu_ticks(pid):
    with open("/proc/%d/stat" % pid) as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12]), fields[0]


def proc_value(pid, name, key):
    for line in Path("/proc/%d/%s" % (pid, name)).read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise OSError("no %s in /proc/%d/%s" % (key, pid, name))


def wait_at_rest(pids, limit=15.0):
    """Wait until no knockd of PIDS used CPU for 0.2 s (at most LIMIT s);
    False if one is gone."""
    deadline = time.monotonic() + limit
    try:
        before = {pid: cpu_ticks(pid) for pid in pids}
        while time.monotonic() < deadline:
            time.sleep(0.2)
            now = {pid: cpu_ticks(pid) for pid in pids}
            if now == before and all(state == "S" for _, state in now.values()):
                return True
            before = now
    except (OSError, TypeError):
        pass
    return False


class Sources:
    """A source address of its own for every probe attempt: 127.A.B.C."""

    def __init__(self):
        self.count = 0

    def next(self):
        self.count += 1
        number = self.count % (200 * 250 * 250)
        return "127.%d.%d.%d" % (2 + number // 62500, number // 250 % 250, number % 250 + 1)


def attempt(source, ports):
    for port in ports:
        probe = socket.socket()
        probe.setblocking(False)
        probe.bind((source, 0))
        # The SYN leaves in connect(); no listener, so the kernel answers
        # with a RST, which knockd's filter (destination ports) ignores.
        probe.connect_ex(("127.0.0.1", port))
        probe.close()


def opened_sources(text):
    return {line.split("] ", 1)[-1].split(":", 1)[0]
            for line in text.splitlines() if ": probe: OPEN SESAME" in line}


def measure_event(argv, env, knockds, moment, sources, cap, log):
    """Run the server with ARGV (an event at MOMENT), its error output going
    to LOG, and measure it: a dict."""
    pids = {k.number: k.pid() for k in knockds}
    hup_offsets = {k.number: size(k.hups) for k in knockds}
    log_offsets = {k.number: size(k.log) for k in knockds}
    cpu_before = {}
    for number, pid in pids.items():
        try:
            cpu_before[number] = cpu_ticks(pid)[0]
        except (OSError, TypeError):
            pass
    hups = {}            # number: [(before, after)] SIGHUPs in this event
    deaf = {}            # number: seconds from SIGHUP to seeing an opening
    sent = {}            # source: (number, time sent)
    next_attempt = {}
    peak, peak_anon, next_sample = 0, 0, 0.0
    died = set()
    started = time.time()
    with open(log, "ab") as errors:
        server = subprocess.Popen([sys.executable, str(SERVER)] + argv, env=env,
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=errors)
    ended = None
    try:
        while True:
            now = time.time()
            if ended is None and server.poll() is not None:
                ended = now
            if now - started > cap:
                break
            for k in knockds:
                lines, hup_offsets[k.number] = new_lines(k.hups, hup_offsets[k.number])
                for line in lines.splitlines():
                    before, after = (float(word) for word in line.split())
                    hups.setdefault(k.number, []).append((before, after))
                    next_attempt.setdefault(k.number, now)
            pending = [n for n in hups if n not in deaf and n not in died]
            for number in pending:
                if now >= next_attempt[number]:
                    source = sources.next()
                    attempt(source, knockds[number].probe)
                    sent[source] = (number, time.time())
                    next_attempt[number] = max(next_attempt[number] + INTERVAL, now)
                knockd = knockds[number]
                text, log_offsets[number] = new_lines(knockd.log, log_offsets[number])
                if any(sent.get(s, (None,))[0] == number for s in opened_sources(text)):
                    deaf[number] = time.time() - hups[number][0][0]
                if not pids[number] or not os.path.exists("/proc/%d" % pids[number]):
                    died.add(number)
            if now >= next_sample:
                total, anon = 0, 0
                for pid in pids.values():
                    try:
                        resident, private = statm(pid)
                    except (OSError, TypeError):
                        continue
                    total += resident
                    anon += private
                peak, peak_anon = max(peak, total), max(peak_anon, anon)
                next_sample = now + SAMPLE
            if ended is not None and all(n in deaf or n in died for n in hups) \
                    and time.time() - ended > 0.1:
                break
            time.sleep(POLL)
        # The attempts sent after a SIGHUP that opened, also late.
        time.sleep(LATE)
        opened, stages = set(), {}
        for k in knockds:
            text = k.log.read_text(errors="replace")
            opened |= opened_sources(text)
            for line in text.splitlines():
                if ": probe: Stage " in line:
                    source = line.split("] ", 1)[-1].split(":", 1)[0]
                    stages[source] = max(stages.get(source, 0), int(line.rsplit(" ", 1)[1]))
        if server.poll() is None:
            try:
                server.wait(timeout=max(1.0, cap - (time.time() - started)))
                ended = time.time()
            except subprocess.TimeoutExpired:
                ended = None
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    cpu = 0
    for number, pid in pids.items():
        try:
            cpu += cpu_ticks(pid)[0] - cpu_before[number]
        except (OSError, TypeError, KeyError):
            pass
    # The attempts that did not open: when, after their knockd's SIGHUP
    # and before its first opening was seen.
    failed = sorted((number, when - hups[number][0][0],
                     deaf[number] - (when - hups[number][0][0]) if number in deaf else None,
                     stages.get(source, 0))
                    for source, (number, when) in sent.items() if source not in opened)
    first_hups = [times[0][0] for times in hups.values()]
    return {"server": ended - started if ended else None, "code": server.returncode,
            "reloaded": len(hups), "extra": sum(len(t) - 1 for t in hups.values()),
            "lag": max(first_hups) - moment if first_hups else None,
            "deaf": sorted(deaf.values()), "unopened": sorted(set(hups) - set(deaf)),
            "died": sorted(died), "sent": len(sent),
            "opened": sum(1 for s in sent if s in opened), "failed": failed, "peak": peak,
            "peak_anon": peak_anon, "cpu": cpu / TICKS, "late": started - moment}


def pss_sum(knockds):
    return sum(proc_value(k.pid(), "smaps_rollup", "Pss") for k in knockds)


def rss_sums(knockds):
    """The sums of VmRSS and of private RSS (see statm)."""
    sizes = [statm(k.pid()) for k in knockds]
    return sum(size for size, _ in sizes), sum(private for _, private in sizes)


def kill_leftovers(folder, knockds):
    """SIGKILL every knockd of KNOCKDS and any process (a trial knockd, a
    server run) whose command line names FOLDER."""
    pids = {k.pid() for k in knockds} - {None}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open("/proc/%s/cmdline" % entry, "rb") as handle:
                    if os.fsencode(str(folder)) in handle.read():
                        pids.add(int(entry))
            except OSError:
                pass
    pids.discard(os.getpid())
    for pid in pids:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass


def sleep_until(moment):
    time.sleep(max(0.0, moment - time.time()))


def problems(event, expected):
    """What went wrong in EVENT, which should have reloaded EXPECTED knockd."""
    found = []
    if event["code"] != 0:
        found.append("server exit %s: %s" % (event["code"], event["error"] or "?"))
    if event["reloaded"] != expected:
        found.append("%d of %d knockd reloaded" % (event["reloaded"], expected))
    if event["extra"]:
        found.append("%d extra SIGHUPs" % event["extra"])
    if event["died"]:
        found.append("knockd %s died" % ",".join(map(str, event["died"])))
    if event["unopened"]:
        found.append("knockd %s never opened within the cap"
                     % ",".join(map(str, event["unopened"])))
    return found


def measure_one(folder, doors, per_knockd, period, grace, trial, flags, cap, rng, sources):
    knockds, names = lay_out(folder, doors, per_knockd, rng)
    env = server_env(folder, names, per_knockd, period, grace, trial, flags)
    config = str(folder / "knockd.conf")
    row = {"doors": doors, "knockd": len(knockds), "events": [], "notes": [], "failed": [],
           "said": []}
    began = time.monotonic()

    def event(kind, argv, moment, expected):
        log = folder / ("server-%s.log" % kind.replace(" ", "-"))
        measured = measure_event(argv, env, knockds, moment, sources, cap, log)
        messages = [line for line in log.read_text(errors="replace").splitlines()
                    if line.startswith("error:") or "warning:" in line]
        measured["error"] = messages[-1] if messages else ""
        measured["kind"] = kind
        row["events"].append(measured)
        found = problems(measured, expected)
        for number, after, before, stage in measured["failed"]:
            row["failed"].append(
                "%s: knockd %d, a probe attempt sent %.0f ms after its SIGHUP%s did not open "
                "(knockd logged it up to stage %d of %d)"
                % (kind, number, after * 1000, "" if before is None else
                   " (%.0f ms before an opening was seen)" % (before * 1000), stage,
                   PROBE_PORTS))
        said = sorted({line.split(" line ")[0] for line in messages})
        row["said"] += ["%s: %d lines like: %s" % (kind, len(messages), line) for line in said[:3]]
        row["notes"] += ["%s: %s" % (kind, what) for what in found]
        print("  %d doors, %s: server %s, deaf %s ms%s" % (
            doors, kind, "%.2f s" % measured["server"] if measured["server"] else "over cap",
            ", ".join("%.0f" % (d * 1000) for d in measured["deaf"]),
            "; " + "; ".join(found) if found else ""), flush=True)
        return not any(word in what for what in found for word in ("died", "never", "exit"))

    try:
        # Start outside a grace window: each knockd starts with K + 1 doors.
        now = time.time()
        if now < now // period * period + grace + 0.05:
            sleep_until(now // period * period + grace + 0.05)
        started = time.time()
        result = subprocess.run([sys.executable, str(SERVER), "--config", config], env=env,
                                stdin=subprocess.DEVNULL, capture_output=True, text=True)
        row["start"] = time.time() - started
        if result.returncode != 0:
            row["notes"].append("start: server exit %d: %s" % (
                result.returncode, (result.stderr.strip().splitlines() or ["?"])[-1]))
            return row
        deadline = time.monotonic() + cap
        while not all(k.pid() and "listening on lo" in k.log.read_text(errors="replace")
                      for k in knockds):
            if time.monotonic() > deadline:
                row["notes"].append("start: not every knockd listens after %g s" % cap)
                return row
            time.sleep(0.05)
        if not wait_at_rest([k.pid() for k in knockds]):
            row["notes"].append("start: a knockd still busy after 15 s, or gone")
        try:
            row["pss_start"] = pss_sum(knockds)
            row["rss_start"] = rss_sums(knockds)
        except (OSError, TypeError):
            row["notes"].append("start: a knockd is gone")
            return row

        # A burn: one door of the last file opened, its knockd alone reloads.
        # Outside a grace window and at least 3 s before the next boundary;
        # if a boundary passed since the start run, an untimed run first
        # brings every file to it.
        while True:
            now = time.time()
            current = now // period * period
            if now < current + grace + 0.05:
                sleep_until(current + grace + 0.05)
            elif now + 3 > current + period:
                sleep_until(current + period + grace + 0.05)
            else:
                break
        if current > started // period * period:
            result = subprocess.run([sys.executable, str(SERVER), "--config", config], env=env,
                                    stdin=subprocess.DEVNULL, capture_output=True, text=True)
            if result.returncode != 0:
                row["notes"].append("catch-up run: server exit %d: %s" % (
                    result.returncode, (result.stderr.strip().splitlines() or ["?"])[-1]))
            wait_at_rest([k.pid() for k in knockds])
        event("burn", ["--config", str(knockds[-1].path), "burn", names[-1] + "_ROTATOR"],
              time.time(), 1)

        # The boundary: every door gets its grace sibling.
        boundary = (int(time.time() + 1) // period + 1) * period
        sleep_until(boundary + 0.01)
        argv = ["--config", config]
        if not event("boundary", argv, boundary, len(knockds)):
            return row
        # The grace end, or once the boundary is measured if later.
        sleep_until(boundary + grace + 0.01)
        if not event("grace end", argv, boundary + grace, len(knockds)):
            return row
        if not wait_at_rest([k.pid() for k in knockds]):
            row["notes"].append("a knockd still busy 15 s after the grace end, or gone")
        try:
            row["pss_rest"] = pss_sum(knockds)
            row["rss_rest"] = rss_sums(knockds)
            row["hwm"] = sum(proc_value(k.pid(), "status", "VmHWM") for k in knockds)
        except (OSError, TypeError):
            row["notes"].append("a knockd died after the grace end")
        return row
    finally:
        row["elapsed"] = time.monotonic() - began
        kill_leftovers(folder, knockds)


def measure(doors_list, per_knockd, period, grace, trial, flags, cap, seed):
    rng, sources = random.Random(seed), Sources()
    rows = []
    for doors in doors_list:
        if rows and any("never" in note or "died" in note or "start:" in note
                        or "exit" in note for note in rows[-1]["notes"]):
            rows.append({"doors": doors, "knockd": -(-doors // per_knockd), "events": [],
                         "notes": ["skipped (%d doors failed)" % rows[-1]["doors"]]})
            continue
        with tempfile.TemporaryDirectory(prefix="krinstances-") as folder:
            row = measure_one(Path(folder), doors, per_knockd, period, grace, trial, flags,
                              cap, rng, sources)
        print("  %d doors: %.0f s%s" % (doors, row["elapsed"], "; " + "; ".join(row["notes"])
                                        if row["notes"] else ""), flush=True)
        rows.append(row)
    return rows


def ms(seconds):
    return "%.0f ms" % (seconds * 1000)


def mb(size):
    return "%.1f MB" % (size / 1e6)


def report(rows, args):
    print("knockd: %s (`knockd %s-d -i lo`); %s (Python %s); %d CPUs; knockd's environment: "
          "%s; period %d s, grace %d s; %d doors per knockd (+1 probe door)%s"
          % (subprocess.run(["knockd", "-V"], capture_output=True, text=True)
             .stdout.splitlines()[0], "-4 " if args.ipv4_only else "", sys.executable,
             sys.version.split()[0], os.cpu_count(), MALLOC_ASSIGNMENTS, args.period, args.grace,
             args.per_knockd, "" if args.trial else "; no trial knockd"))
    print("command: %s %s %s" % (sys.executable, os.path.relpath(__file__),
                                 " ".join(arguments(args))))
    print()
    print("| doors | knockd | event | server run | knockd reloaded | last SIGHUP after the "
          "event | deafness median | max | over 0.2 s | probes opened | knockd CPU | per door |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        if not row["events"]:
            print("| %d | %d | %s | | | | | | | | | |"
                  % (row["doors"], row["knockd"], "; ".join(row["notes"])))
        for event in row["events"]:
            deaf = event["deaf"]
            lag = "-" if event["lag"] is None else "%.2f s" % event["lag"]
            if event["late"] > 0.5:
                lag += " (run started %.2f s late)" % event["late"]
            print("| %d | %d | %s | %s | %d | %s | %s | %s | %d | %d/%d | %.2f s | %.1f ms |"
                  % (row["doors"], row["knockd"], event["kind"],
                     "%.2f s" % event["server"] if event["server"] else "over cap",
                     event["reloaded"], lag, ms(statistics.median(deaf)) if deaf else "-",
                     ms(max(deaf)) if deaf else "-", sum(d > 0.2 for d in deaf),
                     event["opened"], event["sent"], event["cpu"],
                     event["cpu"] * 1000 / row["doors"]))
    print()
    print("| doors | knockd | start run | sum of PSS after the start | sum of PSS at rest after "
          "the events | per door | sum of private RSS at rest | peak sum of private RSS | "
          "per door | sum of RSS at rest | peak sum of RSS | sum of VmHWM | run took |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        peak = max([e["peak"] for e in row["events"]], default=0)
        anon = max([e["peak_anon"] for e in row["events"]], default=0)
        print("| %d | %d | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
            row["doors"], row["knockd"],
            "%.1f s" % row["start"] if "start" in row else "-",
            mb(row["pss_start"]) if "pss_start" in row else "-",
            mb(row["pss_rest"]) if "pss_rest" in row else "-",
            "%.0f KB" % (row["pss_rest"] / row["doors"] / 1e3) if "pss_rest" in row else "-",
            mb(row["rss_rest"][1]) if "rss_rest" in row else "-",
            mb(anon) if anon else "-", "%.0f KB" % (anon / row["doors"] / 1e3) if anon else "-",
            mb(row["rss_rest"][0]) if "rss_rest" in row else "-",
            mb(peak) if peak else "-",
            mb(row["hwm"]) if "hwm" in row else "-",
            "%.0f s" % row["elapsed"] if "elapsed" in row else "-"))
    for row in rows:
        for note in row["notes"] + row.get("failed", []):
            print("note: %d doors, %s" % (row["doors"], note))
        for line in row.get("said", []):
            print("server: %d doors, %s" % (row["doors"], line))


def arguments(args):
    """The command line that repeats this run."""
    return (["--doors", args.doors, "--per-knockd", str(args.per_knockd), "--period",
             str(args.period), "--grace", str(args.grace), "--cap", "%g" % args.cap,
             "--seed", str(args.seed)] + ([] if args.trial else ["--no-trial"])
            + (["--ipv4-only"] if args.ipv4_only else []))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--doors", default="10,50,100,200,500",
                        help="total door counts, comma-separated (default 10,50,100,200,500)")
    parser.add_argument("--per-knockd", type=int, default=core_settings.DEFAULT_DOORS_PER_KNOCKD,
                        help="doors per knockd, as KNOCKD_ROTATOR_DOORS_PER_KNOCKD (default %d)"
                             % core_settings.DEFAULT_DOORS_PER_KNOCKD)
    parser.add_argument("--period", type=int, default=20, help="seconds (default 20)")
    parser.add_argument("--grace", type=int, default=5, help="seconds (default 5)")
    parser.add_argument("--cap", type=float, default=60.0,
                        help="seconds an event may take before that door count and the "
                             "larger ones are given up (default 60)")
    parser.add_argument("--no-trial", dest="trial", action="store_false",
                        help="KNOCKD_ROTATOR_TRIAL_KNOCKD= (no trial knockd at the start)")
    parser.add_argument("--ipv4-only", action="store_true", help="knockd -4")
    parser.add_argument("--seed", type=int, default=17, help="of the probe sequences")
    parser.add_argument(INSIDE, action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    doors_list = sorted(int(d) for d in args.doors.split(","))
    try:
        if args.inside_namespace:
            rows = measure(doors_list, args.per_knockd, args.period, args.grace, args.trial,
                           ["-4"] if args.ipv4_only else [], args.cap, args.seed)
            report(rows, args)
            return 0
        need_root_and("knockd", "ip")
        if not 1 <= args.per_knockd <= 1000 or min(doors_list) < 1:
            sys.exit("error: --per-knockd must be 1 to 1000, and every door count at least 1")
        if not 1 <= args.grace <= args.period // 2:
            sys.exit("error: --grace must be 1 to half the period")
        return in_own_namespace("krinstances", arguments(args))
    except KeyboardInterrupt:
        return 130          # the finally clauses have cleaned up


if __name__ == "__main__":
    sys.exit(main())
