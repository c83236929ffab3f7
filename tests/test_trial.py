"""A file in a shape knockd has not run is tried on knockd before knockd
re-reads it (issue 12): knockd 0.8 exits on a reload of a file it refuses.

The trial knockd is Debian's, in a network namespace of its own."""

import os

import pytest

import knockd_rotator_server as server
from conftest import SECRET, need_root_and, run_server

OPEN = "\tstart_command = true\n\tcmd_timeout = 5\n\tstop_command = true\n"


def doors(count, ports):
    """COUNT static doors of PORTS ports each, all distinct."""
    return "".join("[static%d]\n\tsequence = %s\n%s" % (
        n, ",".join(str(2000 + n * ports + i) for i in range(ports)), OPEN)
        for n in range(count))


def settings(**overrides):
    return dict(server.server_settings({"KNOCKD_ROTATOR_ENV_FILE": "/nonexistent"}),
                **overrides)


@pytest.fixture
def knockd_program():
    need_root_and("knockd", "unshare")
    return server.DEFAULT_TRIAL_KNOCKD


def test_a_file_knockd_takes_passes_and_leaves_nothing(tmp_path, knockd_program):
    log = tmp_path / "knockd.log"
    lines = server.parse_config(("[options]\n\tlogfile = %s\n\tinterface = eth9\n\tUseSyslog\n"
                                 % log + doors(3, 3)).encode())
    assert server.knockd_trial(lines, settings()) == (None, None)
    assert not log.exists(), "the trial writes its own log, not the file's"


def test_a_file_knockd_refuses_is_refused_with_its_words(tmp_path, knockd_program):
    missing = tmp_path / "missing"
    lines = server.parse_config(("[otp]\n\tone_time_sequences = %s\n%s" % (missing, OPEN))
                                .encode())
    refusal, untried = server.knockd_trial(lines, settings())
    assert untried is None
    assert refusal == "%s: No such file or directory" % missing, refusal


def test_one_time_sequences_are_tried_on_copies_as_a_rotation_leaves_them(tmp_path,
                                                                         knockd_program):
    """knockd refuses a used-up file, but a rotation gives it a keeper line
    first; and the trial knockd must not write into the user's file."""
    sequences = tmp_path / "otp"
    sequences.write_bytes(b"#7000,8000,9000\n")
    lines = server.parse_config(("[otp]\n\tone_time_sequences = %s\n%s" % (sequences, OPEN))
                                .encode())
    assert server.knockd_trial(lines, settings()) == (None, None)
    assert sequences.read_bytes() == b"#7000,8000,9000\n"


def test_a_knockd_too_slow_to_listen_is_refused(tmp_path, knockd_program, monkeypatch):
    """knockd hears nothing while it compiles its capture filter, at every
    reload: 200 doors of 10 random ports take about 2.5 s, these 200 of 10
    consecutive ports over 30 s (check found it).  A file that keeps the
    trial from listening within TRIAL_SECONDS is refused."""
    lines = server.parse_config(doors(200, 10).encode())
    monkeypatch.setattr(server, "TRIAL_SECONDS", 0.2)
    refusal, untried = server.knockd_trial(lines, settings())
    assert untried is None and refusal.startswith("it did not listen within 0.2 s"), refusal


def test_a_rotation_tries_only_a_new_shape_and_refuses_before_writing(
        tmp_path, server_env, knockd_program, monkeypatch, capsys):
    config = tmp_path / "knockd.conf"
    config.write_text("[ssh_ROTATOR]\n" + OPEN)
    reloaded = tmp_path / "reloaded"
    environ = server_env(RELOAD_COMMAND="touch %s" % reloaded)
    tried = []
    real_trial = server.knockd_trial

    def counted(lines, settings):
        tried.append(b"".join(line.raw for line in lines))
        return real_trial(lines, settings)
    monkeypatch.setattr(server, "knockd_trial", counted)
    server.rotate(str(config), environ, 10**9)
    assert len(tried) == 1, "the first file is tried"
    server.rotate(str(config), environ, 10**9 + 31622400)
    assert len(tried) == 1, "new sequences in a shape knockd ran are not tried"
    assert reloaded.exists()

    reloaded.unlink()
    config.write_bytes(config.read_bytes() + doors(200, 10).encode())
    before = config.read_bytes()
    monkeypatch.setattr(server, "TRIAL_SECONDS", 0.2)
    with pytest.raises(server.RotatorError) as refused:
        server.rotate(str(config), environ, 10**9 + 2 * 31622400)
    assert len(tried) == 2
    assert refused.value.code == server.EXIT_CONFIG
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
    assert server.check(str(config), environ) == server.EXIT_OK
    config.write_text("[ssh_ROTATOR]\n" + OPEN + doors(200, 10))
    monkeypatch.setattr(server, "TRIAL_SECONDS", 0.2)
    assert server.check(str(config), environ) == server.EXIT_CONFIG
    said = capsys.readouterr().err.splitlines()
    assert [line for line in said if line.startswith(
        "error: knockd refuses %s: it did not listen within 0.2 s" % config)], said
