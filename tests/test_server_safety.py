"""Crash safety, locking, rollback and boundary runs of the server."""

import fcntl
import random
import subprocess
import sys
import time

import pytest

import knockd_rotator_server as server
from conftest import SERVER, run_server, wait_until

SECTIONS = 3000


def big_config(path):
    path.write_text("".join("[door%04d_ROTATOR]\n\tsequence = 1\n\tcommand = true\n" % i
                            for i in range(SECTIONS)))
    return path.read_bytes()


def start_server(config, env):
    return subprocess.Popen([sys.executable, str(SERVER), "--config", str(config)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def temporaries(folder):
    return [p.name for p in folder.iterdir() if p.name.endswith(server.TEMP_SUFFIX)]


@pytest.fixture
def versions(tmp_path, server_env):
    """The original big config and its two rotations (settings A and B)."""
    config = tmp_path / "knockd.conf"
    original = big_config(config)
    envs = [server_env(PERIOD_MODULO=31622400), server_env(PERIOD_MODULO=31622399)]
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
    for attempt in range(40):
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
    assert not server.config_errors(server.parse_config(config.read_bytes()))
    assert temporaries(config.parent) == []


def test_a_run_waits_for_the_lock(tmp_path, server_env):
    config = tmp_path / "knockd.conf"
    original = big_config(config)
    state = tmp_path / "state"
    state.mkdir()
    with open(state / "lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        process = start_server(config, server_env())
        wait_until(lambda: b"state/lock" in subprocess.run(
            ["ls", "-l", "/proc/%d/fd" % process.pid], capture_output=True).stdout,
            10, "the run to open the lock")
        time.sleep(0.5)     # the run holds still while the lock is taken
        assert process.poll() is None and config.read_bytes() == original
    assert process.wait(timeout=30) == 0
    assert config.read_bytes() != original


@pytest.mark.parametrize("overrides,code,words", [
    (dict(RELOAD_COMMAND="echo no such unit >&2; exit 5"), 1,
     "reload command failed (exit 5: no such unit)"),
    # knockd runs before the reload (check 1), is gone after it (check 2), and
    # is back after the recovery (check 3):
    (dict(CHECK_COMMAND="n=$(($(cat {tmp}/checks 2>/dev/null || echo 0) + 1)); "
                        "echo $n > {tmp}/checks; test $n -ne 2"), 1,
     "check command failed (exit 1)"),
    (dict(CHECK_COMMAND="false"), 7, "recovery failed too (check command failed (exit 1))"),
    (dict(CHECK_COMMAND="false", RECOVER_COMMAND="exit 9"), 7, "recovery failed too (exit 9)"),
])
def test_failed_reload_or_check_restores_the_file(tmp_path, server_env, overrides, code, words):
    overrides = {k: v.format(tmp=tmp_path) for k, v in overrides.items()}
    config = tmp_path / "knockd.conf"
    original = b"[ssh_ROTATOR]\n\tsequence = 1\n\tcommand = true\n"
    config.write_bytes(original)
    result = run_server("--config", config, env=server_env(**overrides))
    assert result.returncode == code
    assert words in result.stderr
    assert result.stderr.splitlines()[-1].startswith("error: ")
    assert config.read_bytes() == original
    assert temporaries(tmp_path) == []


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
    assert "next run at %s (boundary run" % server.utc(boundary) in first.stderr
    assert len(pending_runs(tmp_path)) == 1

    second = run_server("--schedule", "--config", config, env=env)
    assert second.returncode == 0, second.stderr
    assert len(pending_runs(tmp_path)) == 1, "a second run leaves the pending one alone"
    pending = int((tmp_path / "state" / "pending").read_text())
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
    """A boundary run adds the grace block; the run it schedules for the grace
    end removes it.  Each reload comes at most 1 s after its event."""
    period, grace = 6, 2
    config = tmp_path / "knockd.conf"
    config.write_bytes(b"[ssh_ROTATOR]\n\tsequence = 1\n\tcommand = true\n")
    reloads = tmp_path / "reloads"
    env = server_env(PERIOD_MODULO=period, GRACE=grace, SERVER_INTERVAL=60,
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
    for (reloaded, _), expected in zip(events[1:], (boundary, boundary + grace)):
        assert 0 <= reloaded - expected <= 1.0, "reloaded %.3f s after the event" % (
            reloaded - expected)
