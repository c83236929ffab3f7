"""When knockd fails: no lock-out, no old sequence pinned, revocation works (issue 12).

Real knockd in a network namespace of the test's own.  The flood is raw TCP
SYNs from random 127.x source addresses to 127.0.0.1 on that namespace's
loopback, bounded in time; knockd 0.8 keeps an attempt per source address
and crashes when a SIGHUP frees them under its packet loop."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import (GUARDED_PORT, SECRET, Watch, alive_command, daemon_start_command,
                      need_root_and, rotator_env, run_client, run_server, wait_until)

FLOOD = r"""
import os, random, socket, struct, sys, time
port, seconds = int(sys.argv[1]), float(sys.argv[2])
raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
def syn(source):
    tcp = struct.pack("!HHIIBBHHH", random.randrange(1024, 65536), port, 0, 0, 5 << 4, 0x02,
                      1024, 0, 0)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 0, 0, 64, socket.IPPROTO_TCP, 0,
                     source, bytes([127, 0, 0, 1]))
    return ip + tcp
packets = [syn(bytes([127, random.randrange(1, 255), random.randrange(256),
                      random.randrange(1, 255)])) for _ in range(4096)]
sent, deadline = 0, time.monotonic() + seconds
while time.monotonic() < deadline and not os.path.exists(sys.argv[3]):
    for packet in packets:
        raw.sendto(packet, ("127.0.0.1", 0))
    sent += len(packets)
print(sent)
"""

DOOR = """
[{name}]
\tseq_timeout   = 10
\ttcpflags      = syn
\tstart_command = {start}
\tcmd_timeout   = 5
\tstop_command  = {stop}
"""
GUARD = "iptables -{} INPUT -s %IP% -p tcp --dport " + str(GUARDED_PORT) + " -j ACCEPT"


class DaemonKnockd:
    """knockd as Debian's unit runs it, but in the test's namespace: started
    by the recover command (so that the server can restart it), pid in a file."""

    def __init__(self, netns, tmp_path, doors, guard=False):
        self.netns, self.tmp_path = netns, tmp_path
        self.config = tmp_path / "knockd.conf"
        self.log = tmp_path / "knockd.log"
        self.pidfile = tmp_path / "knockd.pid"
        start, stop = (GUARD.format("I"), GUARD.format("D")) if guard else ("true", "true")
        self.config.write_text("[options]\n\tlogfile = %s\n%s" % (self.log, "".join(
            DOOR.format(name=name, start=start, stop=stop) for name in doors)))
        self.start = daemon_start_command(netns.name, self.config, self.pidfile)

    def settings(self):
        return dict(RELOAD_COMMAND="kill -HUP $(cat %s)" % self.pidfile,
                    CHECK_COMMAND=alive_command("$(cat %s)" % self.pidfile),
                    RECOVER_COMMAND=self.start, CHECK_SECONDS=1)

    def pid(self):
        try:
            pid = int(self.pidfile.read_text())
            os.kill(pid, 0)
            return pid
        except (OSError, ValueError):
            return None

    def log_text(self):
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@pytest.fixture
def daemon_knockd(netns, tmp_path):
    need_root_and("knockd")
    made = []

    def make(doors, guard=False):
        made.append(DaemonKnockd(netns, tmp_path, doors, guard))
        return made[-1]
    yield make
    # The namespace fixture kills whatever runs in it, knockd included.


def flood(netns, port, seconds, tmp_path):
    stop = tmp_path / "stop-flood"
    if stop.exists():
        stop.unlink()
    process = netns.popen(sys.executable, "-c", FLOOD, port, seconds, stop,
                          stdout=subprocess.PIPE, text=True)
    return process, stop


def sequence(client_lines, service, *args):
    """SERVICE's sequence as the client computes it: [(port, protocol)]."""
    env = rotator_env(SECRET=None)
    env.update(client_lines)
    generated = run_client("generate", service, *args, env=env)
    assert generated.returncode == 0, generated.stderr
    return [tuple(item.split(":")) for item in generated.stdout.strip().split(",")]


def first_port(client_lines, service):
    return int(sequence(client_lines, service)[0][0])


def test_remove_client_succeeds_under_a_flood_of_its_first_port(netns, tmp_path, server_env,
                                                                  daemon_knockd):
    """A stolen phone knows its door's first port and floods it: before,
    knockd crashed at the reload, the rollback put alice's door and secret
    back, and remove-client failed 3 times in 3.  Now: 5 times in 5, alice's
    door and secret are gone, knockd runs."""
    knockd = daemon_knockd(["ssh_ROTATOR"])
    env_file = tmp_path / "rotator.env"
    env_file.write_text("KNOCKD_ROTATOR_SECRET=%s\n" % SECRET)
    env_file.chmod(0o600)
    env = server_env(SECRET=None, ENV_FILE=env_file, **knockd.settings())
    assert run_server("--config", knockd.config, env=env).returncode == 0, "first start"
    wait_until(knockd.pid, 10, "knockd to start")
    crashes = 0
    for attempt in range(5):
        added = run_server("--config", knockd.config, "add-client", "alice", "--firewall",
                           "iptables", "--host", "srv", env=env)
        assert added.returncode == 0, added.stderr
        lines = dict(line.split("=", 1) for line in added.stdout.splitlines()
                     if line.startswith("KNOCKD_ROTATOR_"))
        port = first_port(lines, "alice_ssh")
        pid_before = knockd.pid()
        flooder, stop = flood(netns, port, 20, tmp_path)
        try:
            # knockd keeps an attempt per source: let the list grow first.
            wait_until(lambda: knockd.log_text().count("alice_ssh_ROTATOR: Stage 1") >= 500,
                       15, "knockd to see the flood")
            removed = run_server("--config", knockd.config, "remove-client", "alice", env=env)
        finally:
            stop.touch()
            sent = int(flooder.communicate(timeout=30)[0] or 0)
        assert removed.returncode == 0, removed.stderr
        assert sent > 10000, "the flood sent %d packets" % sent
        assert b"alice" not in knockd.config.read_bytes()
        assert b"ALICE" not in env_file.read_bytes()
        assert wait_until(knockd.pid, 10, "knockd to run")
        crashes += knockd.pid() != pid_before
    print("knockd crashed at %d of 5 reloads under the flood" % crashes)


def test_a_knockd_that_died_at_the_reload_runs_the_new_file(netns, tmp_path, server_env,
                                                           daemon_knockd):
    """A crash at the reload (here: SIGSEGV, as under a flood) is not the new
    file's fault: knockd is started with it, the rotation stands."""
    knockd = daemon_knockd(["ssh_ROTATOR"])
    settings = knockd.settings()
    env = server_env(**settings)
    assert run_server("--config", knockd.config, env=env).returncode == 0
    first = wait_until(knockd.pid, 10, "knockd to start")
    crash = server_env(**dict(settings, RELOAD_COMMAND="kill -SEGV %d" % first),
                       PERIOD_MODULO=31622399)
    result = run_server("--config", knockd.config, env=crash)
    assert result.returncode == 0, result.stderr
    assert "knockd died after the reload" in result.stderr
    assert "it runs with the new file" in result.stderr
    second = wait_until(knockd.pid, 10, "knockd to run again")
    assert second != first
    assert run_server("--config", knockd.config, "--dry-run", env=crash).stdout == "", \
        "the new file stayed"


def test_a_missing_one_time_sequences_file_is_refused(netns, tmp_path, server_env,
                                                     daemon_knockd):
    """knockd refuses the whole file when a one_time_sequences file is
    missing: check reports the line, a rotation refuses with exit 4, and
    knockd keeps running with the file it has."""
    knockd = daemon_knockd(["ssh_ROTATOR"])
    env = server_env(**knockd.settings())
    assert run_server("--config", knockd.config, env=env).returncode == 0
    pid = wait_until(knockd.pid, 10, "knockd to start")
    sequences = tmp_path / "otp"
    with open(knockd.config, "a") as handle:
        handle.write("[otp]\n\tone_time_sequences = %s\n\tstart_command = true\n" % sequences)
    before = knockd.config.read_bytes()
    number = before.count(b"\n")
    checked = run_server("check", "--config", knockd.config, env=env)
    assert checked.returncode == 4
    assert re.search(r"line %d: one_time_sequences file %s" % (number - 1, sequences),
                     checked.stderr), checked.stderr
    result = run_server("--config", knockd.config, env=server_env(
        PERIOD_MODULO=31622399, **knockd.settings()))
    assert result.returncode == 4, result.stderr
    assert "one_time_sequences file" in result.stderr.splitlines()[-1]
    assert knockd.config.read_bytes() == before
    assert not sequences.exists()
    assert knockd.pid() == pid, "knockd was not reloaded and runs on"


def test_a_one_time_sequences_file_that_runs_out_locks_nobody_out(netns, tmp_path, server_env,
                                                                  daemon_knockd):
    """knockd 0.8 disables a door that has used the last line of its
    one_time_sequences file, and exits at the next reload (it refuses a
    used-up file).  The rotation gives the file a keeper line: the user's lines all
    open, knockd runs on and the rotator door still opens; lines added at
    the end open after the next rotation, which moves the keeper."""
    need_root_and("knock")
    knockd = daemon_knockd(["ssh_ROTATOR"])
    sequences = tmp_path / "otp"
    sequences.write_bytes(b"#7000,8000,9000\n7001,8001,9001\n")
    opened = tmp_path / "opened"
    with open(knockd.config, "a") as handle:
        handle.write("[otp]\n\tone_time_sequences = %s\n\tstart_command = echo %%IP%% >> %s\n"
                     % (sequences, opened))
    assert run_server("check", "--config", knockd.config, env=server_env()).returncode == 0
    env = server_env(**knockd.settings())
    first = run_server("--config", knockd.config, env=env)
    assert first.returncode == 0, first.stderr
    assert "%s: added a keeper line" % sequences in first.stderr
    kept = sequences.read_bytes()
    assert kept.startswith(b"#7000,8000,9000\n7001,8001,9001\n# knockd_rotator keeper")
    keeper = kept.splitlines()[-1]
    # As many ports as the line before: knockd 0.8 goes deaf moving on to a longer one.
    assert len(keeper.split(b",")) == 3 and keeper != b"7001,8001,9001"
    pid = wait_until(knockd.pid, 10, "knockd to start")
    again = run_server("--config", knockd.config, env=env)
    assert again.returncode == 0 and sequences.read_bytes() == kept, "a kept file stays as it is"

    def knock(*ports):
        netns.run("knock", "127.0.0.1", *ports)
    knock(7001, 8001, 9001)
    wait_until(lambda: opened.exists() and opened.read_text().count("127.0.0.1") == 1, 10,
               "the last one-time sequence to open")
    assert sequences.read_bytes().startswith(b"#7000,8000,9000\n#001,8001,9001\n")
    # knockd now waits on the keeper, and survives a reload (a used-up file
    # would make it exit); status says the door is used up.
    rereads = knockd.log_text().count("re-reading config file")
    os.kill(pid, signal.SIGHUP)
    wait_until(lambda: knockd.log_text().count("re-reading config file") > rereads, 10,
               "knockd to re-read its file")
    status = run_server("status", "--config", knockd.config, env=env)
    assert status.returncode == 2 and "used up" in status.stdout, status.stdout
    assert knockd.pid() == pid, "knockd runs on after its last one-time sequence"
    assert run_client("knock", "127.0.0.1", "ssh", netns=netns.name,
                      env=rotator_env(PERIOD_MODULO=31622400)).returncode == 0
    wait_until(lambda: "ssh_ROTATOR: OPEN SESAME" in knockd.log_text(), 10,
               "the rotator door to open")

    with open(sequences, "a") as handle:
        handle.write("7002,8002,9002\n")
    moved = run_server("--config", knockd.config, env=env)
    assert moved.returncode == 0, moved.stderr
    assert "%s: moved a keeper line" % sequences in moved.stderr
    lines = sequences.read_bytes().splitlines()
    assert lines[3] == b"#" + keeper[1:] and lines[4] == b"7002,8002,9002"
    assert lines[5].startswith(b"# knockd_rotator keeper") and lines[6] != keeper
    knock(7002, 8002, 9002)
    wait_until(lambda: opened.read_text().count("127.0.0.1") == 2, 10,
               "a line added after the keeper to open")
    assert knockd.pid() == pid


def test_the_last_client_can_be_revoked(tmp_path, server_env):
    """An admin whose only client lost a phone must be able to revoke it; a
    rotation with no rotator door left is a clean no-op."""
    config = tmp_path / "knockd.conf"
    config.write_bytes(b"[options]\n\tlogfile = /dev/null\n")
    env_file = tmp_path / "rotator.env"
    env_file.write_text("KNOCKD_ROTATOR_SECRET=%s\n" % SECRET)
    env_file.chmod(0o600)
    env = server_env(SECRET=None, ENV_FILE=env_file)
    need_root_and("iptables")
    assert run_server("--config", config, "add-client", "alice", "--firewall", "iptables",
                      "--host", "srv", env=env).returncode == 0
    assert b"[alice_ssh_ROTATOR]" in config.read_bytes()
    removed = run_server("--config", config, "remove-client", "alice", env=env)
    assert removed.returncode == 0, removed.stderr
    assert config.read_bytes() == b"[options]\n\tlogfile = /dev/null\n"
    assert "ALICE" not in env_file.read_text()
    again = run_server("--config", config, env=env)
    assert again.returncode == 0
    assert again.stderr.splitlines() == [
        "knockd_rotator: %s has no door whose name ends with _ROTATOR: nothing to rotate"
        % config]


def test_the_watch_keeps_rotating_under_a_flood_timed_to_its_reloads(guarded, tmp_path,
                                                                      server_env, daemon_knockd):
    """The first ports of this period's and the next two periods' sequences
    are flooded across two boundaries and grace ends: every reload meets a
    flooded door.  knockd is restarted with the new file, never the old one,
    so an old sequence never opens after its period and grace, and the
    legitimate knock opens once the flood stops."""
    need_root_and("knock")
    period, grace = 10, 2
    knockd = daemon_knockd(["ssh_ROTATOR"], guard=True)
    lines = {"KNOCKD_ROTATOR_SECRET": SECRET, "KNOCKD_ROTATOR_PERIOD_MODULO": str(period),
             "KNOCKD_ROTATOR_GRACE": str(grace)}
    env = server_env(PERIOD_MODULO=period, GRACE=grace, **knockd.settings())
    watch = Watch(knockd.config, env, tmp_path)
    try:
        wait_until(lambda: "ssh_ROTATOR: rotated" in watch.text(), 10, "the first rotation")
        wait_until(knockd.pid, 10, "knockd to start")
        started = time.time()
        ports = [int(sequence(lines, "ssh", "--offset", str(offset))[0][0])
                 for offset in (0, 1, 2)]
        stop = tmp_path / "stop-flood"
        flooders = [guarded.popen(sys.executable, "-c", FLOOD, port, 2.2 * period, stop,
                                  stdout=subprocess.PIPE, text=True) for port in ports]
        pids = set()
        deadline = time.monotonic() + 2.2 * period
        while time.monotonic() < deadline:
            pids.add(knockd.pid())
            time.sleep(0.05)       # sampling knockd's pid, not waiting for anything
        stop.touch()
        for flooder in flooders:
            flooder.communicate(timeout=30)
        print("knockd pids during the flood: %d" % len(pids - {None}))
        wait_until(knockd.pid, 10, "knockd to run after the flood")
        # knockd works through the flood's backlog (a log line a packet)
        # before it sees another knock: wait until its log holds still.
        sizes = []
        wait_until(lambda: sizes.append(knockd.log.stat().st_size) or
                   sizes[-6:] == [sizes[-1]] * 6, 60, "knockd to work through the flood",
                   interval=0.1)
        # The first period's sequence, now past its period and its grace.
        assert time.time() >= (started // period + 1) * period + grace
        periods_ago = int(time.time() // period - started // period)
        old = sequence(lines, "ssh", "--offset", str(-periods_ago))
        wait_until(lambda: run_server("--config", knockd.config, "--dry-run", env=env).stdout
                   == "", 10, "the file to hold the current sequences")
        guarded.run("knock", "127.0.0.1", *["%s:%s" % item for item in old])
        deadline = time.monotonic() + 1
        while time.monotonic() < deadline:
            assert not guarded.tcp_open(GUARDED_PORT, timeout=0.1), "the old sequence opened"
        knocked = run_client("knock", "127.0.0.1", "ssh", "--check", GUARDED_PORT,
                             "--check-timeout", "5", env=dict(rotator_env(SECRET=None), **lines),
                             netns=guarded.name)
        assert knocked.returncode == 0, knocked.stderr
        assert "rotated" in watch.text() and watch.process.poll() is None
    finally:
        assert watch.stop() == 0


STAND_IN = """
import sys, time
with open("/proc/self/comm", "w") as handle:      # looks like knockd to ps and /proc
    handle.write("knockd")
open(sys.argv[3], "w").write("ready")
time.sleep(60)
"""


def test_status_is_critical_when_knockd_runs_but_hears_nothing(netns, tmp_path, server_env,
                                                              daemon_knockd):
    """A real knockd holds its capture socket: status OK.  Stopped (SIGSTOP),
    it is still `active` for its check command, but hears no knock: CRITICAL.
    A process named knockd that reads the file without capturing: CRITICAL."""
    import json
    import signal
    knockd = daemon_knockd(["ssh_ROTATOR"])
    env = server_env(GRACE=0, **knockd.settings())
    assert run_server("--config", knockd.config, env=env).returncode == 0
    pid = wait_until(knockd.pid, 10, "knockd to start")

    def status():
        result = run_server("status", "--config", knockd.config, "--json", env=env)
        return result.returncode, json.loads(result.stdout)
    code, report = status()
    assert (code, report["state"]) == (0, "OK"), report
    assert report["report"]["knockd_listening"] is True

    os.kill(pid, signal.SIGSTOP)
    try:
        wait_until(lambda: open("/proc/%d/stat" % pid).read().rsplit(")", 1)[1].split()[0]
                   == "T", 5, "knockd to stop")
        code, report = status()
        assert (code, report["reasons"]) == (2, ["knockd (pid %d) is stopped" % pid]), report
    finally:
        os.kill(pid, signal.SIGCONT)
    code, report = status()
    assert code == 0, report
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: knockd.pid() is None, 5, "knockd to end")

    ready = tmp_path / "ready"
    stand_in = netns.popen(sys.executable, "-c", STAND_IN, "-c", str(knockd.config),
                           str(ready))
    try:
        wait_until(ready.exists, 10, "the stand-in to start")
        knockd.pidfile.write_text(str(stand_in.pid))
        code, report = status()
        assert code == 2 and report["report"]["knockd_active"] is True, report
        assert report["reasons"] == [
            "knockd (pid %d) has no packet capture open: it hears no knock" % stand_in.pid]
    finally:
        stand_in.kill()
        stand_in.wait()


def stale_status(knockd, env):
    """status (exit code, reasons) as a monitoring check sees it STATUS_SLACK
    seconds after the file was written: past the time a rotation takes to reload."""
    import json
    need_root_and("faketime")
    result = run_server("status", "--config", knockd.config, "--json", env=env,
                        prefix=["faketime", "-f", "+11s"])
    return result.returncode, json.loads(result.stdout)["reasons"]


def test_a_reload_that_failed_with_knockd_alive_is_done_by_the_next_run(netns, tmp_path,
                                                                       server_env,
                                                                       daemon_knockd):
    """The reload fails once while knockd lives on with the old sequences:
    the file put back holds the current ones, so the file looks current.
    status is CRITICAL until a run reloads knockd, which the next run does."""
    knockd = daemon_knockd(["ssh_ROTATOR"])
    settings = knockd.settings()
    env = server_env(GRACE=0, LEAD=0, **settings)
    assert run_server("--config", knockd.config, env=env).returncode == 0
    wait_until(knockd.pid, 10, "knockd to start")
    failed_once = tmp_path / "failed-once"
    rotated = server_env(GRACE=0, LEAD=0, PERIOD_MODULO=31622399, **dict(
        settings, RELOAD_COMMAND="if [ -e {0} ]; then {1}; else touch {0}; exit 1; fi".format(
            failed_once, settings["RELOAD_COMMAND"])))
    rereads = knockd.log_text().count("re-reading config file")
    failed = run_server("--config", knockd.config, env=rotated)
    assert failed.returncode == 1 and "knockd did not take the new" in failed.stderr, \
        failed.stderr
    assert run_server("--config", knockd.config, "--dry-run", env=rotated).stdout == "", \
        "the file put back holds the current sequences"
    code, reasons = stale_status(knockd, rotated)
    assert code == 2 and reasons == [
        "knockd runs with an older file than %s (a reload failed or was cut short: the next "
        "run reloads it, or run knockd_rotator_server.py)" % knockd.config], reasons

    again = run_server("--config", knockd.config, env=rotated)
    assert again.returncode == 0, again.stderr
    assert "knockd was not seen to load the current" in again.stderr
    wait_until(lambda: knockd.log_text().count("re-reading config file") > rereads, 10,
               "knockd to re-read its file")
    assert run_client("knock", "127.0.0.1", "ssh", netns=netns.name,
                      env=rotator_env(PERIOD_MODULO=31622399)).returncode == 0
    wait_until(lambda: "ssh_ROTATOR: OPEN SESAME" in knockd.log_text(), 10,
               "the current sequence to open")
    assert stale_status(knockd, rotated)[0] == 0
    rereads = knockd.log_text().count("re-reading config file")
    assert run_server("--config", knockd.config, env=rotated).returncode == 0
    assert knockd.log_text().count("re-reading config file") == rereads, \
        "a file knockd has loaded is not loaded again"


def test_a_run_killed_between_the_write_and_the_reload_is_finished_by_the_next(
        netns, tmp_path, server_env, daemon_knockd):
    """SIGKILL of the server when it would reload: the file is current and
    knockd holds the old one.  status is CRITICAL until the next run reloads."""
    knockd = daemon_knockd(["ssh_ROTATOR"])
    settings = knockd.settings()
    env = server_env(**settings)
    assert run_server("--config", knockd.config, env=env).returncode == 0
    wait_until(knockd.pid, 10, "knockd to start")
    rereads = knockd.log_text().count("re-reading config file")
    killed = run_server("--config", knockd.config, env=server_env(
        PERIOD_MODULO=31622399, **dict(settings, RELOAD_COMMAND="kill -KILL $PPID")))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    rotated = server_env(PERIOD_MODULO=31622399, **settings)
    assert run_server("--config", knockd.config, "--dry-run", env=rotated).stdout == ""
    code, reasons = stale_status(knockd, rotated)
    assert code == 2 and reasons[0].startswith("knockd runs with an older file than"), reasons
    assert knockd.log_text().count("re-reading config file") == rereads

    again = run_server("--config", knockd.config, env=rotated)
    assert again.returncode == 0, again.stderr
    wait_until(lambda: knockd.log_text().count("re-reading config file") > rereads, 10,
               "knockd to re-read its file")
    assert stale_status(knockd, rotated)[0] == 0


def process_state(pid):
    with open("/proc/%d/stat" % pid) as handle:
        return handle.read().rsplit(")", 1)[1].split()[0]


def test_a_run_between_events_resumes_a_stopped_knockd(netns, tmp_path, server_env,
                                                      daemon_knockd):
    """A stopped knockd passes its check command and hears no knock.  A run
    that finds the file current sends it SIGCONT: the same knockd, with its
    doors and pending stop_commands, hears knocks again."""
    knockd = daemon_knockd(["ssh_ROTATOR"])
    env = server_env(GRACE=0, **knockd.settings())
    assert run_server("--config", knockd.config, env=env).returncode == 0
    pid = wait_until(knockd.pid, 10, "knockd to start")
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_until(lambda: process_state(pid) == "T", 5, "knockd to stop")
        result = run_server("--config", knockd.config, env=env)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert result.returncode == 0, result.stderr
    assert "knockd (pid %d) was stopped, hearing no knock: sent it SIGCONT" % pid \
        in result.stderr
    assert knockd.pid() == pid
    assert run_client("knock", "127.0.0.1", "ssh", netns=netns.name,
                      env=rotator_env(PERIOD_MODULO=31622400)).returncode == 0
    wait_until(lambda: "ssh_ROTATOR: OPEN SESAME" in knockd.log_text(), 10,
               "the door to open")


# A debugger's hold: attach to knockd (argv 1) and never let it go on, until
# it dies; argv 2 is made once knockd is held.
HOLD = r"""
import ctypes, os, sys
PTRACE_ATTACH, WALL = 16, 0x40000000
pid = int(sys.argv[1])
if ctypes.CDLL(None, use_errno=True).ptrace(PTRACE_ATTACH, pid, None, None) != 0:
    sys.exit("ptrace: errno %d" % ctypes.get_errno())
os.waitpid(pid, WALL)
open(sys.argv[2], "w").close()
while True:
    _, status = os.waitpid(pid, WALL)
    if os.WIFEXITED(status) or os.WIFSIGNALED(status):
        break
"""


def test_a_knockd_that_stays_stopped_is_started_again(netns, tmp_path, server_env,
                                                      daemon_knockd):
    """A knockd held by a debugger stays stopped after SIGCONT: the run ends
    it and starts it again, as a knockd that hangs at a reload."""
    knockd = daemon_knockd(["ssh_ROTATOR"])
    settings = dict(knockd.settings(), KILL_COMMAND="kill -KILL $(cat %s)" % knockd.pidfile)
    env = server_env(GRACE=0, **settings)
    assert run_server("--config", knockd.config, env=env).returncode == 0
    pid = wait_until(knockd.pid, 10, "knockd to start")
    held = tmp_path / "held"
    debugger = subprocess.Popen([sys.executable, "-c", HOLD, str(pid), str(held)])
    try:
        wait_until(lambda: held.exists() or debugger.poll() is not None, 5, "the hold")
        assert debugger.poll() is None, "ptrace refused (kernel.yama.ptrace_scope?)"
        assert process_state(pid) == "t"
        result = run_server("--config", knockd.config, env=env)
        assert result.returncode == 0, result.stderr
        assert "knockd (pid %d) stays stopped after a SIGCONT (a debugger holds it?): ended " \
            "it and started it again" % pid in result.stderr
        debugger.wait(10)
    finally:
        debugger.kill()
        debugger.wait()
    again = wait_until(knockd.pid, 10, "knockd to run again")
    assert again != pid and process_state(again) in "SR"
    assert run_client("knock", "127.0.0.1", "ssh", netns=netns.name,
                      env=rotator_env(PERIOD_MODULO=31622400)).returncode == 0
    wait_until(lambda: "ssh_ROTATOR: OPEN SESAME" in knockd.log_text(), 10,
               "the door to open")


def test_check_reports_a_knockd_that_is_down_or_stopped(netns, tmp_path, server_env,
                                                       daemon_knockd):
    """check exits 7 (knockd is down: act now) when knockd does not run or is
    stopped; with a door that has no sequence yet (knockd would refuse to
    start), it only warns: the first rotation starts knockd."""
    knockd = daemon_knockd(["ssh_ROTATOR"])
    env = server_env(GRACE=0, **knockd.settings())
    assert run_server("--config", knockd.config, env=env).returncode == 0
    pid = wait_until(knockd.pid, 10, "knockd to start")
    assert run_server("check", "--config", knockd.config, env=env).returncode == 0

    os.kill(pid, signal.SIGSTOP)
    try:
        wait_until(lambda: process_state(pid) == "T", 5, "knockd to stop")
        stopped = run_server("check", "--config", knockd.config, env=env)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert stopped.returncode == 7, stopped.stderr
    assert "error: knockd (pid %d) is stopped (run knockd_rotator_server.py, which starts " \
        "or resumes it" % pid in stopped.stderr
    assert "1 errors" in stopped.stdout

    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: knockd.pid() is None, 5, "knockd to end")
    down = run_server("check", "--config", knockd.config, env=env)
    assert down.returncode == 7, down.stderr
    assert "error: knockd is not running (check command failed (exit 1" in down.stderr
    with open(knockd.config, "a") as handle:
        handle.write(DOOR.format(name="web_ROTATOR", start="true", stop="true"))
    first = run_server("check", "--config", knockd.config, env=env)
    assert first.returncode == 0, first.stderr
    assert re.search(r"warning: knockd is not running \(check command failed \(exit 1.*\)\): "
                     r"the first rotation starts it", first.stderr), first.stderr


def test_the_monitoring_account_sees_a_stopped_knockd_and_a_stale_one(netns, server_env):
    """status as a user without the secret, given read access to the file,
    the fingerprints and the loaded record (README, Check and monitor):
    CRITICAL for a stopped knockd, and for one that runs an older file."""
    import json
    import shutil
    import tempfile
    need_root_and("knockd", "setpriv", "faketime")
    # pytest's tmp_path lies under a folder only root may enter.
    folder = tempfile.mkdtemp(prefix="krtest-monitor-")
    try:
        os.chmod(folder, 0o755)
        from pathlib import Path
        knockd = DaemonKnockd(netns, Path(folder), ["ssh_ROTATOR"])
        state = Path(folder) / "state"
        env = server_env(GRACE=0, STATE_DIR=state, **knockd.settings())
        assert run_server("--config", knockd.config, env=env).returncode == 0
        pid = wait_until(knockd.pid, 10, "knockd to start")
        knockd.config.chmod(0o644)
        state.chmod(0o711)
        (state / "fingerprints").chmod(0o644)
        monitoring = server_env(GRACE=0, SECRET=None, STATE_DIR=state,
                                CHECK_COMMAND=alive_command(pid))

        def status(*clock):
            result = run_server("status", "--config", knockd.config, "--json",
                                env=monitoring, cwd="/", prefix=[
                                    "setpriv", "--reuid=nobody", "--regid=nogroup",
                                    "--clear-groups"] + list(clock))
            report = json.loads(result.stdout)
            return result.returncode, report["reasons"], report["report"]
        code, reasons, report = status()
        assert (code, reasons) == (0, []), reasons
        assert report["checked_with"] == "fingerprints"

        os.kill(pid, signal.SIGSTOP)
        try:
            wait_until(lambda: process_state(pid) == "T", 5, "knockd to stop")
            code, reasons, _ = status()
        finally:
            os.kill(pid, signal.SIGCONT)
        assert (code, reasons) == (2, ["knockd (pid %d) is stopped" % pid]), reasons

        (state / "loaded").chmod(0o644)
        code, reasons, report = status()
        assert (code, reasons) == (0, []), reasons
        assert report["knockd_loaded"] is True
        assert report["knockd_listening"] is None, "its descriptors are root's to see"
        (state / "loaded").write_text("%s\n" % ("0" * 64))   # knockd holds another file
        code, reasons, _ = status("faketime", "-f", "+11s")
        assert code == 2 and reasons[0].startswith("knockd runs with an older file"), reasons
    finally:
        shutil.rmtree(folder)
