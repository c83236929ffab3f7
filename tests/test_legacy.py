"""KNOCKD_ROTATOR_ALGORITHM=legacy-v1 reproduces Knock Rotator v1.0.1.

The expected ports are computed here from v1's rule, written out anew:
port = 2000 + int(sha256_hex(f"{period_start}{service}{secret}{i}")[:8], 16) % 63536,
where service includes the _ROTATOR suffix."""

import hashlib
import json
import time

import pytest

import knockd_rotator_client as client
import knockd_rotator_server as server
from conftest import run_server


def v1_ports(secret, service, period_start, length):
    return [2000 + int(hashlib.sha256(f"{period_start}{service}{secret}{i}".encode())
                       .hexdigest()[:8], 16) % 63536 for i in range(1, length + 1)]


@pytest.mark.parametrize("secret, service, now, period, length, modulo", [
    ("legacy-secret-1", "ssh", 1700000000, 21600, 10, 0),
    ("legacy-secret-1", "ssh_ROTATOR", 1700000000, 21600, 10, 0),
    ("another secret with spaces", "web", 1234567890, 3600, 5, 3),
    ("s\u00e9cret-\u00fcnicode", "mail", 86400 * 20000 + 5, 86400, 32, 2),
])
def test_legacy_v1_sequences(capsys, secret, service, now, period, length, modulo):
    env = {"KNOCKD_ROTATOR_SECRET": secret, "KNOCKD_ROTATOR_ALGORITHM": "legacy-v1",
           "KNOCKD_ROTATOR_PERIOD_MODULO": str(period), "KNOCKD_ROTATOR_LENGTH": str(length),
           "KNOCKD_ROTATOR_PORT_MODULO": str(modulo)}
    assert client.run(["generate", service, "--format", "json"], env, now) == 0
    got = json.loads(capsys.readouterr().out)
    start = now // period * period
    assert got["period_start"] == start
    ports = v1_ports(secret, "ssh_ROTATOR" if service.startswith("ssh") else service + "_ROTATOR",
                     start, length)
    assert [p["port"] for p in got["ports"]] == ports
    assert [p["protocol"] for p in got["ports"]] == [
        "tcp" if modulo == 0 or port % modulo == 0 else "udp" for port in ports]
    default = dict(env, KNOCKD_ROTATOR_ALGORITHM="knockd-rotator/1")
    assert client.run(["generate", service, "--format", "json"], default, now) == 0
    assert json.loads(capsys.readouterr().out)["ports"] != got["ports"]


def test_server_writes_legacy_sequences(tmp_path, server_env):
    config = tmp_path / "knockd.conf"
    config.write_bytes(b"[ssh_ROTATOR]\n\tsequence = 1\n\tstop_command = true\n")
    env = server_env(ALGORITHM="legacy-v1", SECRET="legacy-secret-1", PERIOD_MODULO=31622400)
    assert run_server("--config", config, env=env).returncode == 0
    start = int(time.time()) // 31622400 * 31622400
    held = server.door_sequences(server.parse_config(config.read_bytes()))["ssh_ROTATOR"]
    assert held.decode() == ",".join("%d:tcp" % p for p in v1_ports(
        "legacy-secret-1", "ssh_ROTATOR", start, 10))


def test_unknown_algorithm_is_an_error(capsys):
    env = {"KNOCKD_ROTATOR_SECRET": "0123456789", "KNOCKD_ROTATOR_ALGORITHM": "legacy-v2"}
    with pytest.raises(client.RotatorError) as caught:
        client.run(["generate", "ssh"], env, 0)
    assert caught.value.code == client.EXIT_ENVIRONMENT
    assert "use one of: knockd-rotator/1, legacy-v1" in str(caught.value)
