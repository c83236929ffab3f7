"""The server with Debian's knockd and iptables, in a network namespace.

The door guards a TCP listener on port 2222 behind an iptables DROP; its
start_command inserts an ACCEPT for %IP% and its stop_command removes it."""

import re
import subprocess

from conftest import (GUARDED_PORT, accept_rules, alive_command, need_root_and, run_client,
                      run_server, wait_until)

DOOR = """
[ssh_ROTATOR]
\tsequence      = 1
\tseq_timeout   = 10
\ttcpflags      = syn
\tstart_command = iptables -I INPUT -s %IP% -p tcp --dport {port} -j ACCEPT
\tcmd_timeout   = {cmd_timeout}
\tstop_command  = iptables -D INPUT -s %IP% -p tcp --dport {port} -j ACCEPT
"""


def knockd_env(server_env, knockd, **overrides):
    settings = dict(RELOAD_COMMAND="kill -HUP %d" % knockd.pid,
                    CHECK_COMMAND=alive_command(knockd.pid), CHECK_SECONDS=1)
    settings.update(overrides)
    return server_env(**settings)


def knock_until_open(netns, env):
    result = run_client("knock", "127.0.0.1", "ssh", "--check", GUARDED_PORT,
                        "--check-timeout", "5", netns=netns.name, env=env)
    assert result.returncode == 0, result.stderr
    assert "port %d on 127.0.0.1 open after" % GUARDED_PORT in result.stdout


def test_rotation_reload_knock_open_and_close(guarded, start_knockd, server_env):
    knockd = start_knockd(DOOR.format(port=GUARDED_PORT, cmd_timeout=3))
    assert not guarded.tcp_open(GUARDED_PORT), "the DROP rule guards the port"
    env = knockd_env(server_env, knockd)
    result = run_server("--config", knockd.config, env=env)
    assert result.returncode == 0, result.stderr
    assert "ssh_ROTATOR: rotated to the period from" in result.stderr
    knockd.wait_log(r"re-reading config file", "knockd to reload")
    assert "sequence      = 1\n" not in knockd.config.read_text()

    knock_until_open(guarded, env)
    assert accept_rules(guarded) == ["-A INPUT -s 127.0.0.1/32 -p tcp -m tcp --dport %d "
                                     "-j ACCEPT" % GUARDED_PORT]
    wait_until(lambda: not accept_rules(guarded), 3 + 5, "stop_command after cmd_timeout")
    assert not guarded.tcp_open(GUARDED_PORT)


def test_door_opened_before_a_rotation_still_closes(guarded, start_knockd, server_env):
    """A reload (SIGHUP) keeps knockd's pending stop_command children."""
    knockd = start_knockd(DOOR.format(port=GUARDED_PORT, cmd_timeout=4))
    env = knockd_env(server_env, knockd)
    assert run_server("--config", knockd.config, env=env).returncode == 0
    knockd.wait_log(r"re-reading config file", "the first reload")
    knock_until_open(guarded, env)

    before = knockd.config.read_text()
    rotated = run_server("--config", knockd.config, env=knockd_env(server_env, knockd,
                                                                    PERIOD_MODULO=31622399))
    assert rotated.returncode == 0, rotated.stderr
    assert knockd.config.read_text() != before
    knockd.wait_log(r"re-reading config file", "the second reload", count=2)
    assert accept_rules(guarded), "still open within cmd_timeout"
    wait_until(lambda: not accept_rules(guarded), 4 + 5, "the stop_command after the reload")
    assert not guarded.tcp_open(GUARDED_PORT)


def readme_door(firewall):
    """The example door for FIREWALL from docs/DOORS.md, on the guarded port."""
    from test_doors import readme_blocks
    return re.sub(r"(?<![0-9])22(?![0-9])", str(GUARDED_PORT), readme_blocks(firewall)[1])


def test_first_install_with_the_readme_nftables_door(netns, tmp_path, server_env):
    """knockd is not running and docs/DOORS.md's door has no sequence yet (knockd
    refuses to start so): the first rotation writes it and starts knockd."""
    need_root_and("nft", "knockd")
    listener = netns.listen(GUARDED_PORT)
    try:
        from test_doors import readme_blocks
        ruleset = readme_blocks("nftables")[0][0]
        netns.run("nft", "-f", "-", input=re.sub(r"(?<![0-9])22(?![0-9])", str(GUARDED_PORT),
                                                 ruleset))
        door = readme_door("nftables").replace("/usr/sbin/nft", "nft")
        assert "nft add element inet filter knockd_rotator_2222 { %IP% timeout 30s }" in door
        config, pidfile = tmp_path / "knockd.conf", tmp_path / "knockd.pid"
        config.write_text("[options]\n\tlogfile = %s\n%s" % (
            tmp_path / "knockd.log", door.replace("30", "3")))
        running = alive_command("$(cat %s)" % pidfile)
        env = server_env(
            RELOAD_COMMAND="kill -HUP $(cat %s)" % pidfile, CHECK_COMMAND=running,
            RECOVER_COMMAND="ip netns exec %s knockd -d -i lo -c %s -p %s" % (
                netns.name, config, pidfile), CHECK_SECONDS=1)
        result = run_server("--config", config, env=env)
        assert result.returncode == 0, result.stderr
        assert "knockd is not running: starting it with the new file" in result.stderr
        assert not netns.tcp_open(GUARDED_PORT)
        knock_until_open(netns, env)
        assert "127.0.0.1" in netns.run("nft", "list", "set", "inet", "filter",
                                        "knockd_rotator_2222").stdout
        wait_until(lambda: not netns.tcp_open(GUARDED_PORT), 3 + 5, "the door to close")
        assert "127.0.0.1" not in netns.run("nft", "list", "set", "inet", "filter",
                                            "knockd_rotator_2222").stdout
    finally:
        listener.kill()
        listener.wait()


def test_readme_iptables_door_is_the_tested_one():
    """docs/DOORS.md's doors are run by tests/test_doors.py, which reads them
    from there; here: the iptables one is the recent-list door."""
    door = readme_door("iptables")
    assert "start_command   = echo +%IP% > /proc/net/xt_recent/knockd_rotator_2222" in door
    assert "start_command_6 = echo +%IP% > /proc/net/xt_recent/knockd_rotator_2222" in door
    assert "stop_command    = echo -%IP% > /proc/net/xt_recent/knockd_rotator_2222" in door
    assert "stop_command_6  = echo -%IP% > /proc/net/xt_recent/knockd_rotator_2222" in door
    assert "tcpflags        = syn" in door
