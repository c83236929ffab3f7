#!/usr/bin/env python3
"""Benchmark: from starting a knock client to a TCP connect succeeding on the
guarded port, for three clients side by side (issue 14).

In a network namespace of its own (loopback only), with listeners on ports
2222 and 2223 behind an iptables DROP:

  ours    `knockd_rotator_client.py knock 127.0.0.1 ssh --check 2222`, from
          its spawn to its exit 0 (it exits once the port accepted).  Debian's
          knockd guards 2222 with one [ssh_ROTATOR] door whose sequence
          `knockd_rotator_server.py` wrote; the door's start_command inserts
          an iptables ACCEPT, its stop_command deletes it 2 s later.
  knock   knockd's C `knock 127.0.0.1 PORTS...` with the same sequence, to the
          same knockd, then a polling connect to 2222 in this script (a new
          non-blocking connect every 10 ms; the client's --check: 15 ms):
          from the spawn of `knock` to the first connect that succeeds.
  fwknop  Debian's fwknop client sending an SPA packet (keys from an rc file)
          to fwknopd on the namespace's loopback, which opens 2223 for
          127.0.0.1; then the same polling connect.

Each round runs the three once, in a shuffled order; before each measurement
the port is shut again (knockd's stop_command, or flushing fwknopd's chain)
and checked to drop a connect.  It prints each method's median, min and max,
the ratios of the medians and the median of the per-round ratios.  Needs root,
knockd, knock, iptables and ip (tests/run installs them); it installs
fwknop-server and fwknop-client when they are missing, without letting their
daemon start on the host (a policy-rc.d that says no).

    /usr/bin/python3 bench/knock_latency.py [--rounds 25]
"""

import argparse
import base64
import os
import random
import secrets
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLIENT = ROOT / "knockd_rotator_client.py"
SERVER = ROOT / "knockd_rotator_server.py"
KNOCKD_PORT = 2222
FWKNOP_PORT = 2223
CMD_TIMEOUT = 2
POLICY_RC = Path("/usr/sbin/policy-rc.d")
INSIDE = "--inside-namespace"


# ---------------------------------------------------------------- shared with
# bench/concurrent_knockers.py, which imports these.

def door(port, cmd_timeout=None):
    """knockd.conf (with `{log}` left for start_knockd) with one [ssh_ROTATOR]
    door that lets the knocker reach PORT; a stop_command closes it again
    CMD_TIMEOUT seconds later, or, with no CMD_TIMEOUT, the caller does."""
    text = ("[options]\n\tlogfile = {log}\n[ssh_ROTATOR]\n\tsequence      = 1\n"
            "\tseq_timeout   = 5\n\ttcpflags      = syn\n"
            "\tstart_command = iptables -I INPUT -s %%IP%% -p tcp --dport %d -j ACCEPT\n" % port)
    if cmd_timeout is not None:
        text += ("\tcmd_timeout   = %d\n"
                 "\tstop_command  = iptables -D INPUT -s %%IP%% -p tcp --dport %d -j ACCEPT\n"
                 % (cmd_timeout, port))
    return text


def in_own_namespace(prefix, argv):
    """Run this script again, with ARGV and INSIDE, in a new network namespace
    with its loopback up; afterwards (also on an error, Ctrl-C or SIGTERM)
    kill every process left in it and delete it.  Running the whole
    measurement inside saves each timed command the cost of `ip netns exec`."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("stopped"))   # clean up all the same
    namespace = "%s-%d-%s" % (prefix, os.getpid(), uuid.uuid4().hex[:6])
    subprocess.run(["ip", "netns", "add", namespace], check=True)
    try:
        subprocess.run(["ip", "-n", namespace, "link", "set", "lo", "up"], check=True)
        return subprocess.run(["ip", "netns", "exec", namespace, sys.executable,
                               sys.argv[0], INSIDE] + argv).returncode
    finally:
        pids = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True,
                              text=True).stdout.split()
        subprocess.run(["kill", "-KILL"] + pids, check=False, stderr=subprocess.DEVNULL)
        subprocess.run(["ip", "netns", "del", namespace], check=False)


def need_root_and(*programs):
    if os.geteuid() != 0:
        sys.exit("error: needs root to make a network namespace (run it as root)")
    for program in programs:
        if not shutil.which(program):
            sys.exit("error: needs %s (tests/run installs it)" % program)


def listen(port):
    """A listener on 127.0.0.1:PORT that accepts and closes, in a thread."""
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", port))
    server.listen(64)

    def serve():
        while True:
            server.accept()[0].close()
    threading.Thread(target=serve, daemon=True).start()


def start_knockd(folder, door):
    """Debian's knockd on lo with DOOR (see door()), once it listens."""
    config, log = folder / "knockd.conf", folder / "knockd.log"
    config.touch(mode=0o600)        # live sequences: the server warns of a readable file
    config.write_text(door.format(log=log))
    log.write_text("")
    knockd = subprocess.Popen(["knockd", "-i", "lo", "-c", str(config)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while "listening on lo" not in log.read_text():
        if knockd.poll() is not None or time.monotonic() > deadline:
            sys.exit("error: knockd did not start: " + log.read_text())
        time.sleep(0.01)
    return knockd, config, log


def rotator_env(folder, knockd, **settings):
    """The environment of the server and the clients: the test knockd, files
    in FOLDER, a fresh secret; SETTINGS add KNOCKD_ROTATOR_* variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KNOCKD_ROTATOR_")}
    env.update(KNOCKD_ROTATOR_SECRET=secrets.token_urlsafe(32),
               KNOCKD_ROTATOR_STATE_DIR=str(folder / "state"),
               KNOCKD_ROTATOR_ENV_FILE=str(folder / "absent.env"),
               KNOCKD_ROTATOR_RELOAD_COMMAND="kill -HUP %d" % knockd.pid,
               KNOCKD_ROTATOR_CHECK_COMMAND="kill -0 %d" % knockd.pid,
               KNOCKD_ROTATOR_RECOVER_COMMAND="false")
    env.update({"KNOCKD_ROTATOR_" + name: str(value) for name, value in settings.items()})
    return env


def iptables(*arguments, check=True):
    return subprocess.run(["iptables", "-w"] + [str(a) for a in arguments], check=check,
                          capture_output=True, text=True)


# ---------------------------------------------------------------- this benchmark

def poll_connect(port, timeout=10.0):
    """Seconds until 127.0.0.1:PORT accepts, or None after TIMEOUT: a new
    non-blocking connect every 10 ms while the earlier ones are pending (a
    SYN that the DROP swallowed is only sent again after a second)."""
    started = time.monotonic()
    pending = []
    next_attempt = started
    try:
        while time.monotonic() - started < timeout:
            if time.monotonic() >= next_attempt:
                attempt = socket.socket()
                attempt.setblocking(False)
                attempt.connect_ex(("127.0.0.1", port))
                pending.append(attempt)
                next_attempt += 0.010
            wait = max(0.0, next_attempt - time.monotonic())
            for attempt in select.select([], pending, [], wait)[1]:
                if attempt.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                    return time.monotonic() - started
                attempt.close()
                pending.remove(attempt)
        return None
    finally:
        for attempt in pending:
            attempt.close()


def port_is_shut(port):
    """True when a connect gets no answer for 50 ms (the DROP)."""
    probe = socket.socket()
    probe.setblocking(False)
    try:
        probe.connect_ex(("127.0.0.1", port))
        return not select.select([], [probe], [], 0.05)[1]
    finally:
        probe.close()


def shut(port, rule_gone, give_up):
    """Wait until RULE_GONE() and the port drops connects; after GIVE_UP
    seconds that is an error (a rule left over would skew every round)."""
    deadline = time.monotonic() + give_up
    while not (rule_gone() and port_is_shut(port)):
        if time.monotonic() > deadline:
            sys.exit("error: port %d did not shut again:\n%s"
                     % (port, iptables("-S").stdout))
        time.sleep(0.02)


def knockd_rule_gone():
    return "--dport %d -j ACCEPT" % KNOCKD_PORT not in iptables("-S", "INPUT").stdout


def fwknop_rule_gone():
    return "-j ACCEPT" not in iptables("-S", "FWKNOP_INPUT").stdout


def ensure_fwknop():
    """Install Debian's fwknop-server and fwknop-client when missing.  A
    policy-rc.d that exits 101 keeps the package's fwknopd from starting on
    the host; one that was there already is left as it is."""
    if shutil.which("fwknop") and shutil.which("fwknopd"):
        return
    ours = not POLICY_RC.exists()
    if ours:
        POLICY_RC.write_text("#!/bin/sh\nexit 101\n")
        POLICY_RC.chmod(0o755)
    try:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends",
                        "fwknop-server", "fwknop-client"], check=True, env=env)
    finally:
        if ours:
            POLICY_RC.unlink()


def start_fwknopd(folder):
    """fwknopd on lo with its files in FOLDER, opening FWKNOP_PORT to a valid
    SPA packet; returns it and the fwknop client's rc file, which holds the keys."""
    key = base64.b64encode(secrets.token_bytes(32)).decode()
    hmac_key = base64.b64encode(secrets.token_bytes(64)).decode()
    run = folder / "fwknop"
    run.mkdir(mode=0o700)
    files = {
        # fwknopd refuses to read files that others may read.
        "fwknopd.conf": "PCAP_INTF lo;\nFWKNOP_RUN_DIR %s;\n" % run,
        "access.conf": "SOURCE ANY\nOPEN_PORTS tcp/%d\nKEY_BASE64 %s\nHMAC_KEY_BASE64 %s\n"
                       "FW_ACCESS_TIMEOUT 30\n" % (FWKNOP_PORT, key, hmac_key),
        "fwknoprc": "[default]\n[bench]\nSPA_SERVER 127.0.0.1\nACCESS tcp/%d\nALLOW_IP "
                    "127.0.0.1\nKEY_BASE64 %s\nHMAC_KEY_BASE64 %s\nUSE_HMAC Y\n"
                    % (FWKNOP_PORT, key, hmac_key),
    }
    for name, text in files.items():
        path = run / name
        path.touch(mode=0o600)
        path.write_text(text)
    log = run / "fwknopd.log"
    # -f: in the foreground, so that it is this script's child; its pid file
    # and digest cache go to the temp dir, not /run/fwknop.  The iptables
    # chains it makes are the namespace's own.
    fwknopd = subprocess.Popen(["fwknopd", "-f", "-c", str(run / "fwknopd.conf"),
                                "-a", str(run / "access.conf"),
                                "-p", str(run / "fwknopd.pid"), "-d", str(run / "digest.cache")],
                               stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while "main event loop" not in log.read_text():
        if fwknopd.poll() is not None or time.monotonic() > deadline:
            sys.exit("error: fwknopd did not start: " + log.read_text())
        time.sleep(0.01)
    return fwknopd, run / "fwknoprc"


def timed(command, env=None, port=None):
    """Seconds from spawning COMMAND to its exit 0 and, with PORT, then to a
    connect succeeding there; None and the error output on failure."""
    started = time.monotonic()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        return None, result.stderr
    if port is not None and poll_connect(port) is None:
        return None, "port %d did not open within 10 s" % port
    return time.monotonic() - started, result.stderr


def measure(folder, rounds):
    for port in (KNOCKD_PORT, FWKNOP_PORT):
        iptables("-A", "INPUT", "-p", "tcp", "--dport", port, "-j", "DROP")
        listen(port)
    knockd, config, _ = start_knockd(folder, door(KNOCKD_PORT, CMD_TIMEOUT))
    env = rotator_env(folder, knockd)
    fwknopd, rc_file = start_fwknopd(folder)
    try:
        times, failures, retried = rounds_of(methods_for(env, config, rc_file), env, config,
                                             rounds)
    finally:
        # Stopped and reaped here: an orphan would become a zombie of init's.
        fwknopd.terminate()
        knockd.kill()
        for process in (fwknopd, knockd):
            process.wait()
    report(times, failures, retried, rounds)


def client_knock(env, door, port):
    """Our client's `knock --check`, timed (see timed)."""
    return timed([sys.executable, str(CLIENT), "knock", "127.0.0.1", door,
                  "--check", str(port)], env=env)


def c_knock(env, door, port):
    """knockd's C `knock` with DOOR's sequence (generated untimed), then a
    polling connect to PORT, timed (see timed)."""
    sequence = subprocess.run([sys.executable, str(CLIENT), "generate", door, "--format",
                               "knock"], env=env, check=True, capture_output=True,
                              text=True).stdout.split()
    return timed(["knock", "127.0.0.1"] + sequence, port=port)


def methods_for(env, config, rc_file):
    """name: (measure, its port, whether its ACCEPT rule is gone)."""

    def ours():
        return client_knock(env, "ssh", KNOCKD_PORT)

    def c_knock_knockd():
        return c_knock(env, "ssh", KNOCKD_PORT)

    def fwknop():
        return timed(["fwknop", "--rc-file", str(rc_file), "-n", "bench", "--no-save-args"],
                     port=FWKNOP_PORT)

    return {"ours": (ours, KNOCKD_PORT, knockd_rule_gone),
            "knock": (c_knock_knockd, KNOCKD_PORT, knockd_rule_gone),
            "fwknop": (fwknop, FWKNOP_PORT, fwknop_rule_gone)}


def rounds_of(methods, env, config, rounds):
    """[seconds] per method over complete rounds, the failures, and how many
    of our knocks needed the client's retry."""
    times = {name: [] for name in methods}
    failures, retried = [], 0
    for number in range(rounds):
        # Untimed: the sequence of the period as it is now (the default period
        # is 6 h, but a boundary may fall inside the run).
        subprocess.run([sys.executable, str(SERVER), "--config", str(config)], env=env,
                       check=True, capture_output=True)
        order = list(methods)
        random.shuffle(order)
        row = {}
        for name in order:
            method, port, rule_gone = methods[name]
            shut(port, rule_gone, CMD_TIMEOUT + 10)
            took, errors = method()
            if took is None:
                failures.append("round %d, %s: %s" % (number + 1, name, errors.strip()))
            else:
                row[name] = took
                retried += name == "ours" and "knocking again" in errors
            if name == "fwknop":
                # fwknopd would remove its rule only after FW_ACCESS_TIMEOUT.
                iptables("-F", "FWKNOP_INPUT")
        if len(row) == len(methods):          # only complete rounds, to keep them paired
            for name, took in row.items():
                times[name].append(took)
    return times, failures, retried


def report(times, failures, retried, rounds):
    print("interpreter: %s (Python %s); %d rounds, %d complete; knockd guards port %d, "
          "fwknopd port %d, both on the namespace's loopback"
          % (sys.executable, sys.version.split()[0], rounds, len(times["ours"]), KNOCKD_PORT,
             FWKNOP_PORT))
    print("command: %s %s --rounds %d" % (sys.executable, os.path.relpath(__file__), rounds))
    labels = {"ours": "knockd_rotator_client.py knock --check",
              "knock": "C knock + polling connect",
              "fwknop": "fwknop SPA + polling connect"}
    for name, label in labels.items():
        values = [t * 1000 for t in times[name]]
        if values:
            print("  %-40s median %6.1f ms   min %6.1f   max %6.1f"
                  % (label, statistics.median(values), min(values), max(values)))
    print("  our knocks that needed the client's retry: %d" % retried)
    for line in failures:
        print("  FAILED " + line)
    if not times["ours"]:
        sys.exit("error: no complete round")
    median = {name: statistics.median(values) for name, values in times.items()}
    for other, goal in (("fwknop", 1.0), ("knock", 3.0)):
        paired = statistics.median(o / t for o, t in zip(times["ours"], times[other]))
        ratio = median["ours"] / median[other]
        print("ours / %s: %.2f (medians), %.2f (median of the per-round ratios); goal <= %g: %s"
              % (labels[other], ratio, paired, goal, "met" if ratio <= goal else "NOT MET"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument(INSIDE, action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    try:
        if args.inside_namespace:
            with tempfile.TemporaryDirectory() as folder:
                measure(Path(folder), args.rounds)
            return 0
        need_root_and("knockd", "knock", "iptables", "ip")
        ensure_fwknop()
        return in_own_namespace("krlatency", ["--rounds", str(args.rounds)])
    except KeyboardInterrupt:
        return 130          # the finally clauses have cleaned up


if __name__ == "__main__":
    sys.exit(main())
