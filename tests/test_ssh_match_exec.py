"""docs/CLIENTS.md's ssh_config `Match host ... exec` form knocks before ssh connects.

`ssh -G` evaluates the configuration as a connection would, running the
Match exec command, without connecting: the door opens, and the settings
under the Match apply only because the knock succeeded."""

import re
import sys

from conftest import (CLIENT, GUARDED_PORT, ROOT, accept_rules, need_root_and, rotator_env,
                      run_server)
from test_server_knockd import DOOR, knockd_env


def readme_match_line(check_options):
    """docs/CLIENTS.md's Match exec line, for 127.0.0.1 and the test's client and port."""
    readme = (ROOT / "docs" / "CLIENTS.md").read_text()
    match = re.search(r"\n    (Match host myserver exec \"[^\n]+\")\n", readme)
    assert match, "docs/CLIENTS.md shows the Match exec line"
    line = match.group(1)
    assert "knockd_rotator_client.py knock %h ssh --check 22\"" in line
    return (line.replace("myserver", "127.0.0.1")
            .replace("knockd_rotator_client.py", "%s %s" % (sys.executable, CLIENT))
            .replace("--check 22", check_options))


def ssh_settings(netns, tmp_path, line, env):
    """`ssh -G 127.0.0.1` with LINE and a setting under it, in NETNS."""
    config = tmp_path / "ssh_config"
    config.write_text("%s\n    User knocked\n" % line)
    return netns.run("ssh", "-G", "-F", config, "127.0.0.1", env=env, check=False)


def test_match_exec_knocks_and_succeeds(guarded, start_knockd, server_env, tmp_path):
    need_root_and("ssh")
    knockd = start_knockd(DOOR.format(port=GUARDED_PORT, cmd_timeout=60))
    env = knockd_env(server_env, knockd)
    assert run_server("--config", knockd.config, env=env).returncode == 0
    knockd.wait_log(r"re-reading config file", "the rotation's reload")

    result = ssh_settings(guarded, tmp_path, readme_match_line("--check %d" % GUARDED_PORT), env)
    assert result.returncode == 0, result.stderr
    assert "\nuser knocked\n" in "\n" + result.stdout, "the exec command succeeded"
    assert accept_rules(guarded), "and it opened the door"
    assert guarded.tcp_open(GUARDED_PORT)


def test_a_failed_knock_leaves_the_match_unapplied(guarded, start_knockd, tmp_path):
    """Without the right secret the exec fails and ssh does not use the Match."""
    need_root_and("ssh")
    start_knockd(DOOR.format(port=GUARDED_PORT, cmd_timeout=60).replace(
        "sequence      = 1", "sequence      = 7000,9000,8000"))
    result = ssh_settings(guarded, tmp_path, readme_match_line(
        "--check %d --check-timeout 1" % GUARDED_PORT), rotator_env())
    assert "\nuser knocked\n" not in "\n" + result.stdout
    assert not accept_rules(guarded)
