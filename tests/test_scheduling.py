"""Who schedules boundary runs, and what heals a failure (issue 11's defects).

The container test (test_systemd.py) shows each of these under a real
systemd; these pin them down fast and without one."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from knockd_rotator import scheduling as rotator_scheduling
from knockd_rotator.core import errors
from knockd_rotator.core import files as core_files
from knockd_rotator.core import plan
from knockd_rotator.core import settings as core_settings
from conftest import SECRET, SERVER, Watch, need, run_server, wait_until

DOOR = b"[ssh_ROTATOR]\n\tsequence = 1\n\tcommand = true\n"


def boundary_runs(tmp_path):
    listing = subprocess.run(["pgrep", "-f", "%s.* --at " % tmp_path], capture_output=True,
                             text=True).stdout.split()
    return [int(pid) for pid in listing]


def test_a_rotation_never_calls_chown_when_the_owner_is_right(tmp_path, server_env):
    """The units' seccomp filter (~@privileged) refuses fchown() even as a
    no-op: every rotation under systemd failed with EPERM."""
    need(os.geteuid() == 0 and shutil.which("strace"), "needs root and strace")
    config = tmp_path / "knockd.conf"
    config.write_bytes(DOOR)
    trace = tmp_path / "trace"
    result = subprocess.run(["strace", "-f", "-qq", "-o", str(trace), "-e",
                             "trace=chown,fchown,lchown,fchownat", sys.executable, str(SERVER),
                             "--config", str(config)], env=server_env(), capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert b"sequence = 1\n" not in config.read_bytes(), "it rotated"
    assert "chown" not in trace.read_text(), trace.read_text()


def test_a_file_of_another_owner_keeps_its_owner(tmp_path, server_env):
    need(os.geteuid() == 0, "needs root to give a file away")
    config = tmp_path / "knockd.conf"
    config.write_bytes(DOOR)
    os.chown(config, 65534, 65534)
    assert run_server("--config", config, env=server_env()).returncode == 0
    assert (config.stat().st_uid, config.stat().st_gid) == (65534, 65534)


def test_only_a_scheduled_run_leaves_a_boundary_run(tmp_path, server_env):
    """A run by hand says what comes next and leaves no process behind; the
    unit's own run (--schedule) leaves one."""
    config = tmp_path / "knockd.conf"
    config.write_bytes(DOOR)
    env = server_env(PERIOD_MODULO=30, GRACE=0, SERVER_INTERVAL=60)
    before = time.time()
    by_hand = run_server("--config", config, env=env)
    assert by_hand.returncode == 0, by_hand.stderr
    # The run reads the clock once, somewhere in between, and may span an
    # event (the lead's start): either one is right.
    events = {plan.next_event(moment, 30, 0, core_settings.DEFAULT_LEAD)
              for moment in (before, time.time())}
    assert boundary_runs(tmp_path) == []
    assert any("next event at %s, before the timer's next run" % core_files.utc(event)
               in by_hand.stderr for event in events), by_hand.stderr
    assert "systemctl start knockd_rotator.service" in by_hand.stderr

    scheduled = run_server("--schedule", "--config", config, env=env)
    assert scheduled.returncode == 0, scheduled.stderr
    assert len(boundary_runs(tmp_path)) == 1
    again = run_server("--config", config, env=env)
    assert "the timer's boundary run (pid %d) rotates then" % boundary_runs(tmp_path)[0] \
        in again.stderr


def test_add_client_leaves_nothing_holding_the_caller_s_pipe(tmp_path, server_env):
    """`x=$(add-client ... 2>&1)` or `add-client | tee` must return when
    add-client exits: a child that inherits stdout or stderr holds the pipe
    open for as long as it lives (before: until the next boundary, forever)."""
    need(shutil.which("iptables"), "needs iptables (add-client checks the firewall program)")
    config = tmp_path / "knockd.conf"
    config.write_bytes(DOOR)
    env_file = tmp_path / "rotator.env"
    env_file.write_text("KNOCKD_ROTATOR_SECRET=%s\n" % SECRET)
    env_file.chmod(0o600)
    env = server_env(SECRET=None, ENV_FILE=env_file, PERIOD_MODULO=20, GRACE=0)
    started = time.monotonic()
    result = subprocess.run([sys.executable, str(SERVER), "--config", str(config), "add-client",
                             "erin", "--firewall", "iptables", "--host", "srv"], env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, timeout=30)
    assert result.returncode == 0, result.stdout
    assert time.monotonic() - started < 10, "the pipe reached EOF when add-client ended"
    assert boundary_runs(tmp_path) == []


def test_the_watch_ends_the_timer_s_pending_boundary_run(tmp_path, server_env):
    """Switching from the timer to the watch: Conflicts= cannot stop a
    boundary run whose oneshot has ended, so the watch does."""
    config = tmp_path / "knockd.conf"
    config.write_bytes(DOOR)
    env = server_env(PERIOD_MODULO=40, GRACE=0, SERVER_INTERVAL=60)
    assert run_server("--schedule", "--config", config, env=env).returncode == 0
    [pending] = boundary_runs(tmp_path)
    watch = Watch(config, env, tmp_path)
    try:
        wait_until(lambda: "ended the timer's boundary run" in watch.text(), 10,
                   "the watch to end the boundary run")
        wait_until(lambda: pending not in boundary_runs(tmp_path), 5, "the run to be gone")
        assert boundary_runs(tmp_path) == []
    finally:
        assert watch.stop() == 0


def test_the_watch_sees_an_edit_made_while_it_rotates(tmp_path, server_env):
    """A door added during a (slow) reload gets its sequence within seconds,
    not at the next event: the files' times are read before the rotation."""
    config = tmp_path / "knockd.conf"
    config.write_bytes(DOOR)
    reloading = tmp_path / "reloading"
    env = server_env(PERIOD_MODULO=3600, GRACE=0,
                     RELOAD_COMMAND="touch %s; sleep 1.5" % reloading)
    watch = Watch(config, env, tmp_path)
    try:
        wait_until(reloading.exists, 10, "the first reload to begin")
        with open(config, "ab") as handle:     # an editor's (or add-client's) change
            handle.write(b"[web_ROTATOR]\n\tcommand = true\n")
        wait_until(lambda: b"[web_ROTATOR]\n\tsequence = " in config.read_bytes(), 10,
                   "the new door's sequence")
    finally:
        assert watch.stop() == 0


def test_a_failed_scheduled_run_tries_again_within_a_minute(tmp_path, server_env):
    """Timer mode heals: a boundary run whose reload fails leaves a retry, and
    the retry rotates once the reload works."""
    config = tmp_path / "knockd.conf"
    config.write_bytes(DOOR)
    failing = tmp_path / "fail"
    failing.touch()
    env = server_env(PERIOD_MODULO=3600, GRACE=0, RELOAD_COMMAND="test ! -e %s" % failing)
    started = time.time()
    result = run_server("--schedule", "--config", config, env=env)
    assert result.returncode == 1, result.stderr
    assert config.read_bytes() == DOOR
    [retry] = boundary_runs(tmp_path)
    moment = int(open("/proc/%d/cmdline" % retry).read().split("\0")[-2])
    assert started < moment <= started + rotator_scheduling.RETRY_SECONDS + 1
    assert "no retry" not in result.stderr


def test_a_current_file_does_not_hide_a_dead_knockd(tmp_path, server_env):
    """A run that finds nothing to change still checks knockd and starts it."""
    config = tmp_path / "knockd.conf"
    config.write_bytes(DOOR)
    env = server_env()
    assert run_server("--config", config, env=env).returncode == 0
    started = tmp_path / "started"
    dead = server_env(CHECK_COMMAND="test -e %s" % started,
                      RECOVER_COMMAND="touch %s" % started)
    result = run_server("--config", config, env=dead)
    assert result.returncode == 0, result.stderr
    assert started.exists() and "knockd is not running" in result.stderr
    started.unlink()
    still_dead = server_env(CHECK_COMMAND="false", RECOVER_COMMAND="true")
    result = run_server("--config", config, env=still_dead)
    assert result.returncode == errors.EXIT_RECOVERY
    assert result.stderr.splitlines()[-1].startswith("error: knockd is not running")


def test_the_watch_shows_failures_and_exits_after_three(tmp_path, server_env):
    """Not a green `active` while nothing rotates: each failure goes to the
    unit's status line, and the third in a row ends the process."""
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(0.5)
    config = tmp_path / "knockd.conf"
    config.write_bytes(DOOR)
    env = server_env(PERIOD_MODULO=3600, GRACE=0, RELOAD_COMMAND="false")
    env["NOTIFY_SOCKET"] = str(tmp_path / "notify")
    watch = Watch(config, env, tmp_path)
    statuses = []
    try:
        deadline = time.monotonic() + 30
        while watch.process.poll() is None and time.monotonic() < deadline:
            try:
                statuses.append(notify.recv(4096).decode())
            except socket.timeout:
                pass
            os.utime(config)       # a change wakes the watch: the next try comes now
        assert watch.process.wait(5) == errors.EXIT_FAILED, watch.text()
    finally:
        if watch.process.poll() is None:
            watch.process.send_signal(signal.SIGKILL)
            watch.process.wait()
        notify.close()
    assert "3 failed events in a row: exiting" in watch.text()
    assert any(s.startswith("STATUS=FAILING (1 in a row): error: knockd did not take")
               for s in statuses), statuses
    assert statuses[-1].startswith("STATUS=FAILING: error:"), statuses


def test_commands_get_no_secret(tmp_path, server_env):
    """The reload, check and recover commands (and a knockd they start) see
    neither the secret nor a PIN: a unit's EnvironmentFile puts them into
    the server's environment, not theirs."""
    config = tmp_path / "knockd.conf"
    config.write_bytes(DOOR)
    dumps = tmp_path / "environments"
    dump = "env >> %s; echo --- >> %s" % (dumps, dumps)
    env = server_env(RELOAD_COMMAND=dump + "; cat %s >/dev/null" % config, CHECK_COMMAND=dump,
                     PIN_SSH="2468-1357-x")
    result = run_server("--config", config, env=env)
    assert result.returncode == 0, result.stderr
    seen = dumps.read_text()
    assert seen.count("---") >= 3, "the reload and the checks ran"
    assert SECRET not in seen and "2468-1357-x" not in seen
    assert "KNOCKD_ROTATOR_SECRET" not in seen and "KNOCKD_ROTATOR_PIN" not in seen
    assert "KNOCKD_ROTATOR_STATE_DIR=" in seen, "the other settings stay"


@pytest.mark.parametrize("case", ["another user's folder", "writable by others",
                                  "a symlink named lock"])
def test_a_state_folder_others_could_prepare_is_refused(tmp_path, server_env, case):
    """Under a world-writable parent, a local user's state folder, or a lock
    symlink, made root create a file of that user's choosing."""
    need(os.geteuid() == 0, "needs root to play two users")
    parent = tmp_path / "shared"
    parent.mkdir()
    parent.chmod(0o1777)
    state = parent / "state"
    state.mkdir(mode=0o700)
    target = tmp_path / "chosen-by-the-attacker"
    if case == "another user's folder":
        os.chown(state, 65534, 65534)
    elif case == "writable by others":
        state.chmod(0o777)
    else:
        (state / "lock").symlink_to(target)
    config = tmp_path / "knockd.conf"
    config.write_bytes(DOOR)
    result = run_server("--config", config, env=server_env(STATE_DIR=state))
    assert result.returncode == 3, result.stderr
    assert result.stderr.startswith("error: ") and len(result.stderr.splitlines()) == 1
    assert not target.exists() and config.read_bytes() == DOOR


def test_a_pid_taken_over_by_another_process_is_not_the_pending_run(tmp_path, server_env):
    """A local user cycled pids until a process of his had the pending run's
    pid, with a command line naming the script and `--at`: once that run had
    died, every scheduling run took his process for it and scheduled none.
    The record holds the run's start time too, which no pid cycle gives."""
    need(os.geteuid() == 0, "needs root to start a process as another user")
    config = tmp_path / "knockd.conf"
    config.write_bytes(DOOR)
    env = server_env(PERIOD_MODULO=120, GRACE=0, SERVER_INTERVAL=60)
    assert run_server("--schedule", "--config", config, env=env).returncode == 0
    [run] = boundary_runs(tmp_path)
    arguments = open("/proc/%d/cmdline" % run, "rb").read().split(b"\0")
    boundary = arguments[arguments.index(b"--at") + 1].decode()
    os.kill(run, signal.SIGKILL)
    wait_until(lambda: run not in boundary_runs(tmp_path), 5, "the boundary run to end")
    impostor = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                                 str(SERVER), "--config", str(config), "--at", boundary],
                                user=65534, group=65534, cwd="/")
    try:
        # What the pid cycle leaves: the record, naming the impostor's pid.
        pending = tmp_path / "state" / "pending"
        fields = pending.read_text().split()
        pending.write_text(" ".join([str(impostor.pid)] + fields[1:]) + "\n")
        again = run_server("--schedule", "--config", config, env=env)
        assert again.returncode == 0, again.stderr
        assert "next run at" in again.stderr, again.stderr
        assert len(set(boundary_runs(tmp_path)) - {impostor.pid}) == 1
        assert impostor.poll() is None, "a process that is not the run is left alone"
    finally:
        impostor.kill()
        impostor.wait()


def test_the_watch_wakes_when_the_clock_is_set(monkeypatch):
    """A wall clock set back a day (a wrong clock at boot put right) ends the
    watch's pause at once: its next event, a day ahead by the new clock,
    must not keep the doors on the wrong day's sequences.  A clock that only
    runs on pauses until its moment.  (test_nft_server.py shows the whole
    watch plan again under libfaketime.)"""
    from knockd_rotator import watch
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)        # as the watch's wake-up pipe
    set_at = time.monotonic() + 0.3
    real = time.time
    monkeypatch.setattr(watch.time, "time",
                        lambda: real() + (0 if time.monotonic() > set_at else 86400))
    started = time.monotonic()
    watch.pause_until(real() + 86400 + 3600, read_end, [],
                      lambda: time.monotonic() > started + 10)     # a bound on a failure
    assert time.monotonic() - started < 2.5
    monkeypatch.setattr(watch.time, "time", real)
    started = time.monotonic()
    watch.pause_until(real() + 1.5, read_end, [], lambda: False)
    assert 1.4 < time.monotonic() - started < 3
    os.close(read_end)
    os.close(write_end)
