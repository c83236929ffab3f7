"""Bad input across both scripts: one `error:` line, a documented exit code, no
traceback, and knockd.conf byte-identical afterwards.

Client cases that resolve or knock run in a fresh network namespace, so no
lookup or packet leaves it."""

import os
import subprocess

import pytest

from conftest import CLIENT, SERVER, need_root_and, run_script

GOOD = b"[ssh_ROTATOR]\n\tsequence = 1\n\tcommand = true\n\tstop_command = true\n"
EXIT = {"usage": 2, "env": 3, "config": 4, "network": 5, "failed": 1}

# (name, script, arguments, KNOCKD_ROTATOR_* overrides, knockd.conf content
#  or None for the good one, expected exit, words of the message).
# In arguments, CONFIG stands for the knockd.conf path.
CASES = [
    # environment values
    ("secret missing", CLIENT, ["gen", "ssh"], dict(SECRET=None), None, "env",
     "neither KNOCKD_ROTATOR_SECRET_SSH nor KNOCKD_ROTATOR_SECRET is set"),
    ("secret empty", CLIENT, ["gen", "ssh"], dict(SECRET=""), None, "env",
     "KNOCKD_ROTATOR_SECRET is empty"),
    ("secret too short", CLIENT, ["gen", "ssh"], dict(SECRET="Autumn2025!!"), None, "env",
     "KNOCKD_ROTATOR_SECRET holds less than 128 bits"),
    ("length too short", CLIENT, ["gen", "ssh"], dict(LENGTH="6"), None, "env",
     "KNOCKD_ROTATOR_LENGTH is 6: a port scan run twice opens a door of 6 ports in 1 period "
     "out of 72"),
    ("length not a number", CLIENT, ["gen", "ssh"], dict(LENGTH="ten"), None, "env",
     "KNOCKD_ROTATOR_LENGTH must be a whole number from 1 to 32, not 'ten'"),
    ("length zero", CLIENT, ["gen", "ssh"], dict(LENGTH="0"), None, "env",
     "KNOCKD_ROTATOR_LENGTH must be"),
    ("length negative", CLIENT, ["gen", "ssh"], dict(LENGTH="-3"), None, "env",
     "KNOCKD_ROTATOR_LENGTH must be"),
    ("length huge", CLIENT, ["gen", "ssh"], dict(LENGTH="9" * 40), None, "env",
     "KNOCKD_ROTATOR_LENGTH must be"),
    ("period zero", CLIENT, ["gen", "ssh"], dict(PERIOD_MODULO="0"), None, "env",
     "KNOCKD_ROTATOR_PERIOD_MODULO must be"),
    ("period empty", CLIENT, ["gen", "ssh"], dict(PERIOD_MODULO=""), None, "env",
     "KNOCKD_ROTATOR_PERIOD_MODULO must be"),
    ("port modulo negative", CLIENT, ["gen", "ssh"], dict(PORT_MODULO="-1"), None, "env",
     "KNOCKD_ROTATOR_PORT_MODULO must be"),
    ("grace beyond half the period", CLIENT, ["gen", "ssh"],
     dict(PERIOD_MODULO="60", GRACE="31"), None, "env", "KNOCKD_ROTATOR_GRACE must be"),
    ("algorithm unknown", CLIENT, ["gen", "ssh"], dict(ALGORITHM="md5"), None, "env",
     "KNOCKD_ROTATOR_ALGORITHM is 'md5'"),
    ("server secret missing", SERVER, ["--config", "CONFIG"], dict(SECRET=None), None, "env",
     "neither KNOCKD_ROTATOR_SECRET_SSH nor KNOCKD_ROTATOR_SECRET is set"),
    ("server check seconds not a number", SERVER, ["--config", "CONFIG"],
     dict(CHECK_SECONDS="2s"), None, "env", "KNOCKD_ROTATOR_CHECK_SECONDS must be"),
    # 0 passed while knockd had not yet handled the SIGHUP (issue 11, defect 7).
    ("server check seconds zero", SERVER, ["--config", "CONFIG"],
     dict(CHECK_SECONDS="0"), None, "env", "KNOCKD_ROTATOR_CHECK_SECONDS must be"),
    ("server reload command empty", SERVER, ["--config", "CONFIG"],
     dict(RELOAD_COMMAND=" "), None, "env", "KNOCKD_ROTATOR_RELOAD_COMMAND is empty"),
    ("server interval zero", SERVER, ["--config", "CONFIG"], dict(SERVER_INTERVAL="0"),
     None, "env", "KNOCKD_ROTATOR_SERVER_INTERVAL must be"),
    ("server secret weak", SERVER, ["--config", "CONFIG"], dict(SECRET="Autumn2025!!"), None,
     "env", "KNOCKD_ROTATOR_SECRET holds less than 128 bits"),
    ("server length short", SERVER, ["--config", "CONFIG"], dict(LENGTH="8"), None, "env",
     "KNOCKD_ROTATOR_LENGTH is 8: a port scan run twice opens a door of 8 ports"),
    ("legacy-v3 ports overlap", CLIENT, ["gen", "ssh"],
     dict(ALGORITHM="legacy-v3", PORTS="2000-3000,2500-4000"), None, "env",
     "KNOCKD_ROTATOR_PORTS is '2000-3000,2500-4000'"),
    ("legacy-v3 ports beyond 65536", CLIENT, ["gen", "ssh"],
     dict(ALGORITHM="legacy-v3", PORTS="2000-70000"), None, "env", "KNOCKD_ROTATOR_PORTS is"),
    # arguments
    ("door name with a bracket", CLIENT, ["gen", "a]b"], {}, None, "usage",
     "'a]b_ROTATOR' is no knockd door name"),
    ("empty service", CLIENT, ["gen", ""], {}, None, "usage", "'_ROTATOR' is no knockd door"),
    ("PIN typed for a legacy-v1 door", CLIENT, ["gen", "ssh", "--pin"],
     dict(ALGORITHM="legacy-v1"), None, "usage", "door ssh_ROTATOR: legacy-v1 has no PIN"),
    ("unknown client command", CLIENT, ["fly", "ssh"], {}, None, "usage",
     "unknown command 'fly' (choose one of: generate, knock)"),
    ("ambiguous client command", CLIENT, ["", "ssh"], {}, None, "usage",
     "ambiguous command ''"),
    ("bad offset", CLIENT, ["gen", "ssh", "--offset", "x"], {}, None, "usage",
     "'x' is not a whole number"),
    ("offset out of range", CLIENT, ["gen", "ssh", "--offset", "-99999999999999999"], {},
     None, "usage", "is out of range"),
    ("unknown flag", CLIENT, ["gen", "ssh", "--frobnicate"], {}, None, "usage",
     "unrecognized arguments: --frobnicate"),
    ("abbreviated option", CLIENT, ["gen", "ssh", "--off", "1"], {}, None, "usage",
     "unrecognized arguments: --off 1"),
    ("bad format", CLIENT, ["gen", "ssh", "--format", "xml"], {}, None, "usage",
     "invalid choice: 'xml'"),
    ("check port out of range", CLIENT, ["knock", "127.0.0.1", "ssh", "--check", "70000"], {},
     None, "usage", "'70000' is not a port from 1 to 65535"),
    ("check port zero", CLIENT, ["knock", "127.0.0.1", "ssh", "--check", "0"], {}, None,
     "usage", "'0' is not a port"),
    ("negative delay", CLIENT, ["knock", "127.0.0.1", "ssh", "--delay", "-5"], {}, None,
     "usage", "'-5' is not milliseconds"),
    ("unknown server command", SERVER, ["--config", "CONFIG", "rotate-now"], {}, None, "usage",
     "unknown command 'rotate-now'"),
    ("unknown server flag", SERVER, ["--config", "CONFIG", "--frobnicate"], {}, None, "usage",
     "unrecognized arguments: --frobnicate"),
    ("dry run and watch", SERVER, ["--config", "CONFIG", "--dry-run", "--watch"], {}, None,
     "usage", "not allowed with argument"),
    # config files
    ("config missing", SERVER, ["--config", "CONFIG.missing"], {}, None, "config",
     "cannot read"),
    ("config is a directory", SERVER, ["--config", "DIRECTORY"], {}, None, "config",
     "Is a directory"),
    ("binary garbage", SERVER, ["--config", "CONFIG"], {}, b"\xfe\xff garbage = \x01\n", "config",
     "line 1: directive before the first section"),
    ("binary garbage in a door", SERVER, ["--config", "CONFIG"], {},
     GOOD + bytes(range(14, 256)) + b"\n", "config", "line 5: unknown key"),
    ("rotator door knockd would refuse", SERVER, ["--config", "CONFIG"], {},
     GOOD + b"\tstart_comand = true\n", "config", "unknown key 'start_comand'"),
    ("check of a refused file", SERVER, ["check", "--config", "CONFIG"], {},
     GOOD + b"\ttcpflags = syn, ack\n", "config", "space around tcp flag"),
    # runtime failures
    ("reload fails", SERVER, ["--config", "CONFIG"], dict(RELOAD_COMMAND="exit 3"), None,
     "failed", "knockd did not take the new"),
    # knockd dies at the reload and will not start with the new file.
    ("knockd refuses the new file", SERVER, ["--config", "CONFIG"],
     dict(RELOAD_COMMAND="touch MARK", CHECK_COMMAND="test ! -e MARK",
          RECOVER_COMMAND="grep -q 'sequence = 1$' CONFIG && rm -f MARK"), None, "failed",
     "knockd died after the reload (check command failed (exit 1)) and refused to start"),
    # hosts (in a namespace of their own: no lookup leaves it)
    ("unresolvable host", CLIENT, ["knock", "no-such-host.invalid", "ssh"], {}, None,
     "network", "cannot resolve"),
    ("malformed IPv4", CLIENT, ["knock", "999.1.1.1", "ssh", "-4"], {}, None, "network",
     "cannot resolve"),
    ("malformed IPv6", CLIENT, ["knock", "::g", "ssh", "-6"], {}, None, "network",
     "cannot resolve"),
    ("IPv4 address with -6", CLIENT, ["knock", "127.0.0.1", "ssh", "-6"], {}, None, "network",
     "cannot resolve"),
]


def test_at_least_30_cases():
    assert len(CASES) >= 30


@pytest.mark.parametrize("name, script, args, overrides, content, kind, words", CASES,
                         ids=[case[0] for case in CASES])
def test_bad_input(request, tmp_path, server_env, name, script, args, overrides, content,
                   kind, words):
    config, mark = tmp_path / "knockd.conf", tmp_path / "mark"
    (tmp_path / "directory").mkdir()
    config.write_bytes(GOOD if content is None else content)
    before = config.read_bytes()
    overrides = {key: value if value is None else
                 value.replace("MARK", str(mark)).replace("CONFIG", str(config))
                 for key, value in overrides.items()}
    env = server_env(**overrides)
    args = [a.replace("CONFIG", str(config)).replace("DIRECTORY", str(tmp_path / "directory"))
            for a in args]
    netns = request.getfixturevalue("netns").name if kind == "network" else None
    result = run_script(script, *args, env=env, netns=netns)
    assert result.returncode == EXIT[kind], (result.returncode, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and lines[0].endswith(")"), lines[0]
    assert words in lines[0], lines[0]
    assert "Traceback" not in result.stdout + result.stderr
    assert config.read_bytes() == before


def test_config_unreadable_for_a_user_who_is_not_root(tmp_path, server_env):
    need_root_and("setpriv")
    config = tmp_path / "knockd.conf"
    config.write_bytes(GOOD)
    config.chmod(0o600)
    os.chmod(tmp_path, 0o755)
    env = server_env(STATE_DIR=tmp_path / "state")
    for command in (["check"], ["--dry-run"]):
        result = run_script(SERVER, *command, "--config", config, env=env,
                            prefix=["setpriv", "--reuid=nobody", "--regid=nogroup",
                                    "--clear-groups"], cwd="/")
        assert result.returncode == 4, result.stderr
        assert result.stderr.startswith("error: cannot read %s: Permission denied" % config)
        assert len(result.stderr.splitlines()) == 1
    assert config.read_bytes() == GOOD
    assert subprocess.run(["stat", "-c", "%a", str(config)], capture_output=True,
                          text=True).stdout.strip() == "600"
