"""Crash safety, locking, rollback and boundary runs of the server."""

import fcntl
import random
import subprocess
import sys
import time

import pytest

from knockd_rotator.core import files
from knockd_rotator.engines.knockd import config as knockd_config
from conftest import SERVER, in_fast_tier, run_server, wait_until

SECTIONS = 3000


def big_config(path):
    path.write_text("".join("[door%04d_ROTATOR]\n\tsequence = 1\n\tcommand = true\n" % i
                            for i in range(SECTIONS)))
    return path.read_bytes()


def start_server(config, env):
    return subprocess.Popen([sys.executable, str(SERVER), "--config", str(config)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def temporaries(folder):
    return [p.name for p in folder.iterdir() if p.name.endswith(files.TEMP_SUFFIX)]


@pytest.fixture
def versions(tmp_path, server_env):
    """The original big config and its two rotations (settings A and B)."""
    config = tmp_path / "knockd.conf"
    original = big_config(config)
    # No trial on knockd: a file this big is about the swap, and knockd 0.8
    # could not compile its capture filter (the trial says so, and refuses).
    envs = [server_env(PERIOD_MODULO=31622400, TRIAL_KNOCKD=""),
            server_env(PERIOD_MODULO=31622399, TRIAL_KNOCKD="")]
    rotated = []
    for env in envs:
        config.write_bytes(original)
        assert run_server("--config", config, env=env).returncode == 0
        rotated.append(config.read_bytes())
    config.write_bytes(original)
    assert len({original, *rotated}) == 3
    return config, original, rotated, envs


def test_kill_9_at_random_instants_leaves_old_or_new(versions):
    config, original, rotated, envs = versions
    started = time.monotonic()
    assert start_server(config, envs[0]).wait() == 0
    run_time = time.monotonic() - started
    config.write_bytes(original)
    generator = random.Random(20261121)
    outcomes = set()
    for attempt in range(in_fast_tier(40, 10)):
        process = start_server(config, envs[attempt % 2])
        time.sleep(generator.uniform(0, run_time * 1.2))   # a random instant to kill at
        process.kill()
        process.wait()
        content = config.read_bytes()
        assert content in (original, *rotated), "a mix after kill -9 at attempt %d" % attempt
        outcomes.add(content)
    assert len(outcomes) >= 2, "the kills should land both before and after the swap"
    assert start_server(config, envs[0]).wait() == 0
    assert config.read_bytes() == rotated[0]
    assert temporaries(config.parent) == [], "a complete run removes what killed runs left"


def test_concurrent_runs_leave_a_valid_file(versions):
    config, original, rotated, envs = versions
    processes = [start_server(config, envs[i % 2]) for i in range(8)]
    assert [p.wait(timeout=120) for p in processes] == [0] * 8
    assert config.read_bytes() in rotated
    assert not knockd_config.config_errors(knockd_config.parse_config(config.read_bytes()))
    assert temporaries(config.parent) == []


def test_a_run_waits_for_the_lock(tmp_path, server_env):
    config = tmp_path / "knockd.conf"
    original = big_config(config)
    state = tmp_path / "state"
    state.mkdir()
    with open(state / "lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        process = start_server(config, server_env(TRIAL_KNOCKD=""))   # see versions()
        wait_until(lambda: b"state/lock" in subprocess.run(
            ["ls", "-l", "/proc/%d/fd" % process.pid], capture_output=True).stdout,
            10, "the run to open the lock")
        time.sleep(0.5)     # the run holds still while the lock is taken
        assert process.poll() is None and config.read_bytes() == original
    assert process.wait(timeout=30) == 0
    assert config.read_bytes() != original


# A fake knockd: it runs while {tmp}/alive exists; the reload command is
# given per case, the recover command starts it (touch) when the file on
# disk is one knockd would take (by default any).
ALIVE = dict(CHECK_COMMAND="test -e {tmp}/alive", RECOVER_COMMAND="touch {tmp}/alive")


@pytest.mark.parametrize("overrides,code,words,kept", [
    # The reload command fails, knockd still runs with its old doors.
    (dict(ALIVE, RELOAD_COMMAND="echo no such unit >&2; exit 5"), 1,
     "reload command failed (exit 5: no such unit)", "old"),
    # knockd dies at the reload (a crash under a flood): it is started with
    # the new file, which it takes; no rollback.
    (dict(ALIVE, RELOAD_COMMAND="rm {tmp}/alive"), 0,
     "knockd died after the reload (check command failed (exit 1)); it runs with the new "
     "file", "new"),
    # knockd lives but never re-reads the file (a deadlock in its SIGHUP
    # handler under a flood): it is killed and started with the new file.
    (dict(ALIVE, RELOAD_COMMAND="true", KILL_COMMAND="rm {tmp}/alive; touch {tmp}/killed"), 0,
     "knockd hung after the reload and was killed (knockd did not re-read the file within 1 s",
     "new"),
    # A knockd that re-reads the file (opens it) is no hung one.
    (dict(ALIVE, RELOAD_COMMAND="cat {tmp}/knockd.conf >/dev/null",
          KILL_COMMAND="touch {tmp}/killed"), 0, "", "new"),
    # knockd dies, and refuses to start with the new file: the old one is back.
    (dict(ALIVE, RELOAD_COMMAND="rm {tmp}/alive",
          RECOVER_COMMAND="grep -q 'sequence = 1$' {tmp}/knockd.conf && touch {tmp}/alive"), 1,
     "and refused to start with the new", "old"),
    (dict(CHECK_COMMAND="false"), 7,
     "knockd was not running, and it starts neither with the new", "old"),
    (dict(CHECK_COMMAND="false", RECOVER_COMMAND="exit 9"), 7, "recover command failed (exit 9)",
     "old"),
])
def test_a_failed_reload_is_decided_on_the_evidence(tmp_path, server_env, overrides, code, words,
                                                    kept):
    overrides = {k: v.format(tmp=tmp_path) for k, v in overrides.items()}
    (tmp_path / "alive").touch()
    config = tmp_path / "knockd.conf"
    original = b"[ssh_ROTATOR]\n\tsequence = 1\n\tcommand = true\n"
    config.write_bytes(original)
    result = run_server("--config", config, env=server_env(**overrides))
    assert result.returncode == code, result.stderr
    assert words in result.stderr
    if code:
        assert result.stderr.splitlines()[-1].startswith("error: ")
    assert (config.read_bytes() == original) == (kept == "old")
    assert temporaries(tmp_path) == []
    assert (tmp_path / "killed").exists() == ("hung" in words)


def test_a_rollback_goes_to_the_last_file_knockd_ran_with(tmp_path, server_env):
    """Not to whatever was on disk before the run: an edit knockd never ran
    with (here: one it refuses) is not what comes back, and the file that
    comes back holds the current sequences."""
    config = tmp_path / "knockd.conf"
    config.write_bytes(b"[ssh_ROTATOR]\n\tsequence = 1\n\tcommand = true\n")
    alive = tmp_path / "alive"
    alive.touch()
    env = server_env(PERIOD_MODULO=31622400, CHECK_COMMAND="test -e %s" % alive,
                     RELOAD_COMMAND="rm %s" % alive,
                     RECOVER_COMMAND="grep -q refused %s || touch %s" % (config, alive))
    assert run_server("--config", config, env=env).returncode == 0
    good = config.read_bytes()
    assert (tmp_path / "state" / "last-good").read_bytes() == good
    assert oct((tmp_path / "state" / "last-good").stat().st_mode & 0o777) == "0o600"
    # An edit knockd would refuse, then a rotation to another period.
    config.write_bytes(good + b"[refused]\n\tsequence = 7001,7003,7002\n\tcommand = true\n")
    later = server_env(PERIOD_MODULO=31622399, CHECK_COMMAND="test -e %s" % alive,
                       RELOAD_COMMAND="rm %s" % alive,
                       RECOVER_COMMAND="grep -q refused %s || touch %s" % (config, alive))
    result = run_server("--config", config, env=later)
    assert result.returncode == 1, result.stderr
    back = config.read_bytes()
    assert b"refused" not in back and back != good, "the last good file, at today's sequence"
    dry = run_server("--config", config, "--dry-run", env=later)
    assert dry.returncode == 0 and dry.stdout == "", "it holds the current sequences"


def pending_runs(tmp_path):
    listing = subprocess.run(["pgrep", "-f", "%s.* --at " % tmp_path], capture_output=True,
                             text=True).stdout.split()
    return [int(pid) for pid in listing]


def test_boundary_run_happens_on_time_and_only_one_is_pending(tmp_path, server_env):
    period = 5
    config = tmp_path / "knockd.conf"
    config.write_bytes(b"[ssh_ROTATOR]\n\tsequence = 1\n\tcommand = true\n")
    reloads = tmp_path / "reloads"
    env = server_env(PERIOD_MODULO=period, GRACE=0, SERVER_INTERVAL=60,
                     RELOAD_COMMAND="date +%%s.%%N >> %s" % reloads)
    # Start early in a period, so that the two runs below share it.
    wait_until(lambda: time.time() % period < 1, period + 1, "the start of a period")
    first = run_server("--schedule", "--config", config, env=env)
    assert first.returncode == 0, first.stderr
    boundary = (int(time.time()) // period + 1) * period
    assert "next run at %s (boundary run" % files.utc(boundary) in first.stderr
    assert len(pending_runs(tmp_path)) == 1

    second = run_server("--schedule", "--config", config, env=env)
    assert second.returncode == 0, second.stderr
    assert len(pending_runs(tmp_path)) == 1, "a second run leaves the pending one alone"
    pending = int((tmp_path / "state" / "pending").read_text().split()[0])
    assert pending_runs(tmp_path) == [pending]

    times = wait_until(lambda: reloads.exists() and len(reloads.read_text().split()) >= 2 and
                       [float(t) for t in reloads.read_text().split()], period + 5,
                       "the boundary run's reload")
    lag = times[1] - boundary
    assert 0 <= lag <= 1.0, "reloaded %.3f s after the boundary" % lag
    # The boundary run scheduled the next boundary in turn, and is gone itself.
    wait_until(lambda: pending_runs(tmp_path) and pending not in pending_runs(tmp_path), 5,
               "the next boundary run")
    assert len(pending_runs(tmp_path)) == 1


def test_no_boundary_run_when_the_timer_comes_first(tmp_path, server_env):
    config = tmp_path / "knockd.conf"
    config.write_bytes(b"[ssh_ROTATOR]\n\tsequence = 1\n\tcommand = true\n")
    result = run_server("--schedule", "--config", config,
                        env=server_env(PERIOD_MODULO=31622400, SERVER_INTERVAL=60))
    assert result.returncode == 0
    if (int(time.time()) // 31622400 + 1) * 31622400 - time.time() > 200:
        assert "next run" not in result.stderr and pending_runs(tmp_path) == []


def test_boundary_and_grace_end_runs_happen_on_the_second(tmp_path, server_env):
    """A boundary run at the lead's start (1 s before the boundary) adds the
    grace block; the run it schedules for the grace end removes it.  Each
    reload comes at most 1 s after its event."""
    period, grace, lead = 6, 2, 1
    config = tmp_path / "knockd.conf"
    config.write_bytes(b"[ssh_ROTATOR]\n\tsequence = 1\n\tcommand = true\n")
    reloads = tmp_path / "reloads"
    env = server_env(PERIOD_MODULO=period, GRACE=grace, LEAD=lead, SERVER_INTERVAL=60,
                     RELOAD_COMMAND="(date +%%s.%%N; grep -c _GRACE %s; true) >> %s" % (config, reloads))
    wait_until(lambda: grace + 0.2 < time.time() % period < period - 2, period + 1,
               "a moment out of the grace, 2 s before a boundary")
    assert run_server("--schedule", "--config", config, env=env).returncode == 0
    boundary = (int(time.time()) // period + 1) * period

    def reload_lines():
        return reloads.exists() and reloads.read_text().split()
    lines = wait_until(lambda: len(reload_lines() or ()) >= 6 and reload_lines(),
                       period + grace + 5, "the first run, the boundary run, the grace end run")
    events = [(float(lines[i]), int(lines[i + 1])) for i in range(0, 6, 2)]
    assert [blocks for _, blocks in events] == [0, 1, 0], "no block, a block, no block"
    for (reloaded, _), expected in zip(events[1:], (boundary - lead, boundary + grace)):
        assert 0 <= reloaded - expected <= 1.0, "reloaded %.3f s after the event" % (
            reloaded - expected)
