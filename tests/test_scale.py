"""200 rotator doors in one knockd.conf, as a server with one door per client
has them: after a rotation, every door opens with the real client.

Real knockd in a network namespace guards port 2222 (the guarded fixture).
Each door has its own secret; its start_command leaves a marker named after
the door and puts the knocker into the iptables recent list that lets it
reach the port, as add-client's iptables doors do, so that the client's
--check sees it open and retries as it would for a user."""

import os
import re
import signal
import subprocess
import time

from knockd_rotator.engines.knockd import processes
from knockd_rotator.engines.knockd import upkeep
from conftest import (GUARDED_PORT, SECRET, alive_command, daemon_start_command, need_root_and,
                      run_client, run_server, wait_until)
from test_server_knockd import knockd_env
from test_trial import settings as trial_settings

DOORS = 200
RECENT = "/proc/net/xt_recent/knockd_rotator_%d" % GUARDED_PORT
# cmd_timeout outlasts the test: a stop_command taking 127.0.0.1 out of the
# list while a later door's --check waits would look like a missed knock.
DOOR = """
[{name}_ROTATOR]
\tsequence        = 1
\tseq_timeout     = 10
\ttcpflags        = syn
\tstart_command   = touch {marks}/{name} && echo +%IP% > {recent}
\tstart_command_6 = touch {marks}/{name} && echo +%IP% > {recent}
\tcmd_timeout     = 600
\tstop_command    = echo -%IP% > {recent}
\tstop_command_6  = echo -%IP% > {recent}
"""


def door_name(number):
    return "c%03d_ssh" % number


def knock(netns, env, name, check_timeout):
    return run_client("knock", "127.0.0.1", name, "--check", GUARDED_PORT, "--check-timeout",
                      check_timeout, netns=netns.name, env=env)


def shut(netns):
    """Empty the recent list, so that the next door's --check starts closed."""
    netns.run("sh", "-c", "echo / > %s" % RECENT)


def test_200_doors_each_with_its_own_secret_all_open_after_a_rotation(
        guarded, start_knockd, server_env, tmp_path):
    need_root_and("knockd", "iptables")
    marks = tmp_path / "opened"
    marks.mkdir()
    names = [door_name(number) for number in range(DOORS)]
    knockd = start_knockd("".join(DOOR.format(name=name, marks=marks, recent=RECENT)
                                  for name in names))
    # No general secret: a door that did not take its own would fail the rotation.
    secrets = {"SECRET_" + name.upper(): "%s-%s" % (SECRET, name) for name in names}
    env = knockd_env(server_env, knockd, SECRET=None, GRACE=0, **secrets)

    started = time.monotonic()
    rotated = run_server("--config", knockd.config, env=env, timeout=120)
    rotation = time.monotonic() - started
    assert rotated.returncode == 0, rotated.stderr
    assert rotated.stderr.count(": rotated to the period from") == DOORS, rotated.stderr
    assert "knockd holds %d doors" % DOORS in rotated.stderr, "the crowded-knockd warning"
    sequences = re.findall(r"^\tsequence *= (.*)$", knockd.config.read_text(), re.M)
    assert len(sequences) == len(set(sequences)) == DOORS and "1" not in sequences
    knockd.wait_log(r"re-reading config file", "knockd to reload")

    # knockd hears nothing while it compiles the filter of all the doors
    # (seconds at 200 doors, longer than the client's one retry a second
    # later covers): the first door is knocked, a knock a second, until it
    # opens, which times that deafness.
    reloaded = time.monotonic()
    wait_until(lambda: knock(guarded, env, names[0], 1).returncode == 0, 30,
               "knockd to hear the first door after the reload", interval=0)
    deaf = time.monotonic() - reloaded
    shut(guarded)

    started = time.monotonic()
    retried = []
    for name in names[1:]:
        result = knock(guarded, env, name, 5)
        assert result.returncode == 0, "%s: %s" % (name, result.stderr)
        # The marker is written before the port opens.
        assert (marks / name).exists(), "%s: another door let the client in" % name
        if "knocking again" in result.stderr:
            retried.append(name)
        shut(guarded)
    took = time.monotonic() - started

    assert sorted(path.name for path in marks.iterdir()) == names
    print("server run: %.1f s; then to the first door open: %.1f s; %d doors knocked in "
          "%.1f s (%.0f ms each); needed the client's retry: %d %s"
          % (rotation, deaf, DOORS - 1, took, 1000 * took / (DOORS - 1), len(retried), retried))


def test_a_knockd_busy_with_an_earlier_reload_is_waited_for_not_killed(
        start_knockd, server_env, tmp_path):
    """knockd compiles the filter of 200 doors of 10 ports for seconds in its
    SIGHUP handler, and a SIGHUP that comes meanwhile waits for it: the
    rotation's reload does not show in CHECK_SECONDS (1 s here).  knockd keeps
    using CPU, so it is busy, not hung: the server waits for it to re-read
    the file instead of killing it (which loses every pending stop_command)."""
    need_root_and("knockd")
    names = [door_name(number) for number in range(DOORS)]
    knockd = start_knockd("".join(DOOR.format(name=name, marks=tmp_path, recent="/dev/null")
                                  for name in names))
    killed = tmp_path / "killed"
    env = knockd_env(server_env, knockd, GRACE=0, KILL_COMMAND="touch %s" % killed)
    assert run_server("--config", knockd.config, env=env, timeout=120).returncode == 0

    def idle():
        before = processes.knockd_processes(knockd.config)[knockd.pid][2]
        time.sleep(0.3)
        return processes.knockd_processes(knockd.config)[knockd.pid][2] == before
    wait_until(idle, 60, "knockd to finish the first reload", interval=0)
    rereads = knockd.log_text().count("re-reading config file")
    knockd.reload()            # someone else's reload, just before the rotation's
    started = time.monotonic()
    rotated = run_server("--config", knockd.config, env=dict(env, KNOCKD_ROTATOR_PERIOD_MODULO=
                                                              "31622399"), timeout=120)
    took = time.monotonic() - started
    assert rotated.returncode == 0, rotated.stderr
    assert "hung" not in rotated.stderr and not killed.exists(), rotated.stderr
    assert knockd.process.poll() is None
    assert knockd.log_text().count("re-reading config file") == rereads + 2
    print("the rotation waited %.1f s for the busy knockd" % took)
    assert took > 1, "the reload was not slower than CHECK_SECONDS: nothing was tested"


def test_a_grown_knockd_is_restarted_when_no_stop_command_waits(netns, tmp_path, monkeypatch):
    """knockd 0.8 leaks at every reload while it listens on IPv6 (lo has
    ::1).  Past LEAK_BOUND of growth (100 KB here) the rotation restarts it,
    but not while a child waits to run a stop_command."""
    need_root_and("knockd", "knock", "pkill")
    config, log, pidfile = tmp_path / "knockd.conf", tmp_path / "knockd.log", tmp_path / "pid"
    config.write_text("[options]\n\tlogfile = %s\n[held]\n\tsequence = 7001,7003,7002\n"
                      "\tstart_command = true\n\tcmd_timeout = 600\n\tstop_command = true\n"
                      % log + "".join("[static%d]\n\tsequence = %d,%d,%d\n\tstart_command = true\n"
                                      % (n, 9000 + n, 20000 + n, 15000 + n) for n in range(100)))
    start = daemon_start_command(netns.name, config, pidfile)
    subprocess.run(start, shell=True, check=True)
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    settings = trial_settings(tmp_path, RECOVER_COMMAND=start, CHECK_SECONDS=1,
                              KILL_COMMAND="kill -KILL $(cat %s)" % pidfile,
                              CHECK_COMMAND=alive_command("$(cat %s)" % pidfile))
    monkeypatch.setattr(upkeep, "LEAK_BOUND", 100 * 1024)

    pid = int(pidfile.read_text())

    def reload(count):
        os.kill(pid, signal.SIGHUP)
        wait_until(lambda: log.read_text().count("re-reading config file") == count, 10,
                   "reload %d" % count)
    reload(1)       # the server looks only after a reload, past the first heap
    sizes = state / upkeep.KNOCKD_SIZE
    wait_until(lambda: upkeep.restart_when_grown(str(config), settings) is None
               and sizes.exists(), 10, "knockd at rest, its size noted")
    seen = int(sizes.read_text().split()[1])
    reload(2)
    assert upkeep.restart_when_grown(str(config), settings) is None, "not grown enough"
    for count in range(3, 41):
        reload(count)
    grown = upkeep.resident_bytes(pid) - seen
    print("knockd grew by %d bytes in 39 reloads of 101 doors" % grown)
    assert grown > 100 * 1024, "the leak did not show: nothing would be tested"

    netns.run("knock", "127.0.0.1", 7001, 7003, 7002)
    wait_until(lambda: "held: running command" in log.read_text(), 10, "the door to open")
    assert upkeep.restart_when_grown(str(config), settings) is None
    assert int(pidfile.read_text()) == pid, "restarted while a stop_command was pending"

    subprocess.run(["pkill", "-KILL", "-P", str(pid)], check=True)   # as if it had run
    wait_until(lambda: not subprocess.run(["pgrep", "-P", str(pid)]).stdout, 10,
               "the child to be gone", interval=0.05)
    restarted = wait_until(lambda: upkeep.restart_when_grown(str(config), settings), 10,
                           "the restart of knockd at rest")
    assert restarted.startswith("knockd had grown by"), restarted
    assert int(pidfile.read_text()) != pid
    wait_until(lambda: upkeep.restart_when_grown(str(config), settings) is None
               and int(sizes.read_text().split()[0]) == int(pidfile.read_text()), 10,
               "the new knockd's size noted")
