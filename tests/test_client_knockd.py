"""The client against Debian's real knockd, in a network namespace."""

import re

import pytest

from conftest import need_root_and, run_client

DOOR = """
[ssh_ROTATOR]
\tsequence = {sequence}
\tseq_timeout = 10
\ttcpflags = syn
\tcommand = touch {marker}/opened-%IP%
"""


def door_for(tmp_path, **env):
    from conftest import rotator_env
    sequence = run_client("generate", "ssh", env=rotator_env(**env)).stdout.strip()
    return sequence, DOOR.format(sequence=sequence, marker=tmp_path)


@pytest.mark.parametrize("host,family", [("127.0.0.1", "-4"), ("::1", "-6")])
def test_knock_opens_the_door(netns, start_knockd, tmp_path, host, family):
    _, config = door_for(tmp_path)
    knockd = start_knockd(config)
    result = run_client("knock", host, "ssh", family, netns=netns.name)
    assert result.returncode == 0, result.stderr
    knockd.wait_log(r"ssh_ROTATOR: OPEN SESAME", "the door to open")
    marker = tmp_path / ("opened-" + host)
    from conftest import wait_until
    wait_until(marker.exists, 5, "the start_command's file")


def test_knock_with_udp_knocks_and_a_delay(netns, start_knockd, tmp_path):
    sequence, config = door_for(tmp_path, PORT_MODULO=3)
    assert ":udp" in sequence and ":tcp" in sequence
    knockd = start_knockd(config)
    env_args = {"env": __import__("conftest").rotator_env(PORT_MODULO=3)}
    result = run_client("kn", "127.0.0.1", "ssh", "--delay", "20", netns=netns.name, **env_args)
    assert result.returncode == 0, result.stderr
    knockd.wait_log(r"OPEN SESAME", "the door to open")


def test_c_knock_client_opens_the_door_with_knock_format(netns, start_knockd, tmp_path):
    need_root_and("knock")
    _, config = door_for(tmp_path)
    knockd = start_knockd(config)
    ports = run_client("generate", "ssh", "--format", "knock").stdout.split()
    netns.run("knock", "127.0.0.1", *ports)
    knockd.wait_log(r"OPEN SESAME", "the door to open")


def test_wrong_secret_does_not_open(netns, start_knockd, tmp_path):
    _, config = door_for(tmp_path)
    knockd = start_knockd(config)
    from conftest import rotator_env
    env = rotator_env(SECRET="some-other-secret-entirely")
    assert run_client("knock", "127.0.0.1", "ssh", netns=netns.name, env=env).returncode == 0
    # A correct knock afterwards proves knockd was listening all along.
    assert run_client("knock", "127.0.0.1", "ssh", netns=netns.name).returncode == 0
    knockd.wait_log(r"OPEN SESAME", "the right knock to open")
    assert knockd.log_text().count("OPEN SESAME") == 1


def test_a_tcp_knock_is_exactly_one_syn(netns, start_knockd, tmp_path):
    """With the knock ports dropped (no RST back), a blocking connect would be
    retransmitted after 1 s; count what reaches the firewall after 1.5 s."""
    need_root_and("iptables")
    sequence, config = door_for(tmp_path)
    ports = [item.split(":")[0] for item in sequence.split(",")]
    netns.run("iptables", "-A", "INPUT", "-p", "tcp", "-m", "multiport",
              "--dports", ",".join(ports), "-j", "DROP")
    knockd = start_knockd(config)
    assert run_client("knock", "127.0.0.1", "ssh", netns=netns.name).returncode == 0
    knockd.wait_log(r"OPEN SESAME", "the door to open")
    import time
    time.sleep(1.5)  # the window in which a retransmission would show
    counters = netns.run("iptables", "-L", "INPUT", "-v", "-n", "-x").stdout
    packets = int(re.search(r"^\s*(\d+)\s+\d+\s+DROP", counters, re.M).group(1))
    assert packets == len(ports)


def test_check_reports_open_and_closed_ports(netns, tmp_path):
    listener = netns.listen(2222)
    try:
        opened = run_client("knock", "127.0.0.1", "ssh", "--check", "2222", netns=netns.name)
        assert opened.returncode == 0 and "port 2222 on 127.0.0.1 open after" in opened.stdout
        closed = run_client("knock", "127.0.0.1", "ssh", "--check", "2223",
                            "--check-timeout", "0.5", netns=netns.name)
        assert closed.returncode == 1
        assert closed.stderr.startswith("error: port 2223 on 127.0.0.1 did not open within 0.5 s")
    finally:
        listener.kill()
        listener.wait()
