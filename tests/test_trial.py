"""A file in a shape knockd has not run is tried on knockd before knockd
re-reads it (issue 12): knockd 0.8 exits on a reload of a file it refuses.

The trial knockd is Debian's, in a network namespace of its own."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from knockd_rotator import rotation as rotator_rotation
from knockd_rotator.engines.knockd import report as status
from knockd_rotator.core import errors
from knockd_rotator.core import files
from knockd_rotator.core import generator
from knockd_rotator.core import settings as core_settings
from knockd_rotator.engines.knockd import config as knockd_config
from knockd_rotator.engines.knockd import trial as engine_trial
from conftest import SECRET, SERVER, alive_command, need_root_and, run_server, wait_until

OPEN = "\tstart_command = true\n\tcmd_timeout = 5\n\tstop_command = true\n"


def doors(count, ports):
    """COUNT static doors of PORTS ports each, all distinct."""
    return "".join("[static%d]\n\tsequence = %s\n%s" % (
        n, ",".join(str(2000 + n * ports + i) for i in range(ports)), OPEN)
        for n in range(count))


def settings(tmp_path, **overrides):
    return dict(core_settings.server_settings({"KNOCKD_ROTATOR_ENV_FILE": "/nonexistent"}),
                STATE_DIR=str(tmp_path / "state"), **overrides)


@pytest.fixture
def knockd_program():
    need_root_and("knockd", "unshare")
    return core_settings.DEFAULT_TRIAL_KNOCKD


def test_a_file_knockd_takes_passes_and_leaves_nothing(tmp_path, knockd_program):
    log = tmp_path / "knockd.log"
    lines = knockd_config.parse_config(("[options]\n\tlogfile = %s\n\tinterface = eth9\n\tUseSyslog\n"
                                 % log + doors(3, 3)).encode())
    assert engine_trial.knockd_trial(lines, settings(tmp_path)) == (None, None)
    assert not log.exists(), "the trial writes its own log, not the file's"


def test_a_file_knockd_refuses_is_refused_with_its_words(tmp_path, knockd_program):
    missing = tmp_path / "missing"
    lines = knockd_config.parse_config(("[otp]\n\tone_time_sequences = %s\n%s" % (missing, OPEN))
                                .encode())
    refusal, untried = engine_trial.knockd_trial(lines, settings(tmp_path))
    assert untried is None
    assert refusal == "%s: No such file or directory" % missing, refusal


def test_one_time_sequences_are_tried_on_copies_as_a_rotation_leaves_them(tmp_path,
                                                                         knockd_program):
    """knockd refuses a used-up file, but a rotation gives it a keeper line
    first; and the trial knockd must not write into the user's file."""
    sequences = tmp_path / "otp"
    sequences.write_bytes(b"#7000,8000,9000\n")
    lines = knockd_config.parse_config(("[otp]\n\tone_time_sequences = %s\n%s" % (sequences, OPEN))
                                .encode())
    assert engine_trial.knockd_trial(lines, settings(tmp_path)) == (None, None)
    assert sequences.read_bytes() == b"#7000,8000,9000\n"


def test_a_knockd_too_slow_to_listen_is_refused(tmp_path, knockd_program, monkeypatch):
    """knockd hears nothing while it compiles its capture filter, at every
    reload: 200 doors of 10 random ports take about 2.5 s, these 200 of 10
    consecutive ports over 30 s (check found it).  A file that keeps the
    trial from listening within TRIAL_SECONDS is refused."""
    lines = knockd_config.parse_config(doors(200, 10).encode())
    monkeypatch.setattr(engine_trial, "TRIAL_SECONDS", 0.2)
    refusal, untried = engine_trial.knockd_trial(lines, settings(tmp_path))
    assert untried is None and refusal.startswith("it did not listen within 0.2 s"), refusal


def test_a_rotation_tries_only_a_new_shape_and_refuses_before_writing(
        tmp_path, server_env, knockd_program, monkeypatch, capsys):
    config = tmp_path / "knockd.conf"
    config.write_text("[ssh_ROTATOR]\n" + OPEN)
    reloaded = tmp_path / "reloaded"
    environ = server_env(RELOAD_COMMAND="touch %s" % reloaded)
    tried = []
    real_trial = engine_trial.knockd_trial

    def counted(lines, settings):
        tried.append(b"".join(line.raw for line in lines))
        return real_trial(lines, settings)
    monkeypatch.setattr(engine_trial, "knockd_trial", counted)
    rotator_rotation.rotate(str(config), environ, 10**9)
    assert len(tried) == 1, "the first file is tried"
    rotator_rotation.rotate(str(config), environ, 10**9 + 31622400)
    assert len(tried) == 1, "new sequences in a shape knockd ran are not tried"
    assert reloaded.exists()

    reloaded.unlink()
    config.write_bytes(config.read_bytes() + doors(200, 10).encode())
    before = config.read_bytes()
    monkeypatch.setattr(engine_trial, "TRIAL_SECONDS", 0.2)
    with pytest.raises(generator.RotatorError) as refused:
        rotator_rotation.rotate(str(config), environ, 10**9 + 2 * 31622400)
    assert len(tried) == 2
    assert refused.value.code == errors.EXIT_CONFIG
    assert "knockd refuses the new %s: it did not listen within 0.2 s" % config \
        in refused.value.what
    assert config.read_bytes() == before and not reloaded.exists()


@pytest.mark.knockd
def test_without_the_capability_the_file_is_not_tried_and_it_says_so(tmp_path, server_env):
    need_root_and("knockd", "setpriv")
    config = tmp_path / "knockd.conf"
    config.write_text("[ssh_ROTATOR]\n" + OPEN)
    result = run_server("--config", config, env=server_env(), prefix=[
        "setpriv", "--bounding-set=-all", "--inh-caps=-all", "--ambient-caps=-all"])
    assert result.returncode == 0, result.stderr
    assert "warning: the new %s was not tried on knockd first (" % config in result.stderr


def test_check_says_what_knockd_says(tmp_path, server_env, knockd_program, monkeypatch, capsys):
    config = tmp_path / "knockd.conf"
    config.write_text("[ssh_ROTATOR]\n" + OPEN + doors(20, 3))
    environ = server_env()
    assert status.check(str(config), environ) == errors.EXIT_OK
    config.write_text("[ssh_ROTATOR]\n" + OPEN + doors(200, 10))
    monkeypatch.setattr(engine_trial, "TRIAL_SECONDS", 0.2)
    assert status.check(str(config), environ) == errors.EXIT_CONFIG
    said = capsys.readouterr().err.splitlines()
    assert [line for line in said if line.startswith(
        "error: knockd refuses %s: it did not listen within 0.2 s" % config)], said


def test_the_next_run_removes_what_a_run_killed_during_a_trial_left(tmp_path, server_env,
                                                                    knockd_program):
    """A run SIGKILLed during a trial left its 0700 folder behind (in /tmp),
    with the new sequences in its copy of knockd.conf, and the trial knockd
    running on it.  The folder is in the state folder, named for its run: the
    next run ends that knockd and removes the folder once the run is gone,
    and leaves alone the folders of runs that are not."""
    config = tmp_path / "knockd.conf"
    # A knockd compiles this (200 doors of 10 consecutive ports) for over 30 s.
    marker = "killed_%s" % tmp_path.name
    config.write_text("[ssh_ROTATOR]\n%s[%s]\n\tsequence = 1999\n%s%s"
                      % (OPEN, marker, OPEN, doors(200, 10)))
    run = subprocess.Popen([sys.executable, str(SERVER), "--config", str(config)],
                           env=server_env(), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)

    def trial_knockd():
        for pid in subprocess.run(["pgrep", "-x", "knockd"], capture_output=True,
                                  text=True).stdout.split():
            try:
                argv = open("/proc/%s/cmdline" % pid, "rb").read().decode().split("\0")
                path = Path(argv[argv.index("-c") + 1])
                if marker in path.read_text():
                    return int(pid), path.parent
            except (OSError, ValueError):
                pass
    def runs(pid):
        return subprocess.run(alive_command(pid), shell=True).returncode == 0
    try:
        knockd, folder = wait_until(trial_knockd, 20, "the trial knockd")
    finally:
        run.kill()
        run.wait()
    assert b"sequence = " in (folder / "knockd.conf").read_bytes(), "the new sequences"
    alive = tmp_path / "state" / ("%s%d-%d-x" % (engine_trial.TRIAL_PREFIX, os.getpid(),
                                                 files.process_start(os.getpid())))
    try:
        alive.mkdir()
        result = run_server("--config", config, env=server_env(TRIAL_KNOCKD=""))
        assert result.returncode == 0, result.stderr
        assert not folder.exists()
        wait_until(lambda: not runs(knockd), 5, "the trial knockd to end")
        assert alive.is_dir(), "the folder of a run that is still there"
    finally:
        if runs(knockd):
            os.kill(knockd, signal.SIGKILL)
