"""KNOCKD_ROTATOR_ALGORITHM=legacy-v1 reproduces Knock Rotator v1.0.1.

The expected ports are computed here from v1's rule, written out anew:
port = 2000 + int(sha256_hex(f"{period_start}{service}{secret}{i}")[:8], 16) % 63536,
where service includes the _ROTATOR suffix."""

import hashlib
import json
import time

import pytest

import knockd_rotator_client as client
from knockd_rotator.core import generator
from knockd_rotator.engines.knockd import config as knockd_config
from conftest import rotator_env, run_client, run_server


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
    door = "ssh_ROTATOR" if service.startswith("ssh") else service + "_ROTATOR"
    assert client.generate_sequence(secret.encode(), door, start, length, modulo) \
        != client.legacy_v1_sequence(secret.encode(), door, start, length, modulo)


def test_server_writes_legacy_sequences(tmp_path, server_env):
    config = tmp_path / "knockd.conf"
    config.write_bytes(b"[ssh_ROTATOR]\n\tsequence = 1\n\tstop_command = true\n")
    env = server_env(ALGORITHM="legacy-v1", SECRET="legacy-secret-1", PERIOD_MODULO=31622400)
    assert run_server("--config", config, env=env).returncode == 0
    start = int(time.time()) // 31622400 * 31622400
    held = knockd_config.door_sequences(knockd_config.parse_config(config.read_bytes()))["ssh_ROTATOR"]
    assert held.decode() == ",".join("%d:tcp" % p for p in v1_ports(
        "legacy-secret-1", "ssh_ROTATOR", start, 10))


def test_a_salt_is_a_secret_for_add_client_and_its_commands(tmp_path, server_env):
    """SALT, a legacy door's secret, stays out of knockd.conf (a burn command
    passes on the run's settings, and knockd logs the commands it runs) and
    out of the environment of the commands the server runs."""
    config, env_file, dump = tmp_path / "knockd.conf", tmp_path / "rotator.env", tmp_path / "env"
    config.write_bytes(b"[ssh_ROTATOR]\n\tsequence = 1\n\tstop_command = true\n")
    env_file.write_text("KNOCKD_ROTATOR_ALGORITHM_SSH=legacy-v1\n"
                        "KNOCKD_ROTATOR_SALT_SSH=legacy-salt-of-ssh\n")
    env = server_env(SECRET=None, ENV_FILE=env_file, SALT="legacy-salt-general",
                     SALT_SSH="legacy-salt-of-ssh", RELOAD_COMMAND="env > %s" % dump)
    added = run_server("--config", config, "add-client", "alice", "--firewall", "iptables",
                       env=env)
    assert added.returncode == 0, added.stderr
    assert "burn alice_ssh_ROTATOR" in config.read_text(), "a single-use door"
    for leaked in ("legacy-salt-general", "legacy-salt-of-ssh"):
        assert leaked not in config.read_text()
        assert leaked not in dump.read_text()
        assert leaked not in added.stdout + added.stderr


def test_unknown_algorithm_is_an_error(capsys):
    env = {"KNOCKD_ROTATOR_SECRET": "0123456789", "KNOCKD_ROTATOR_ALGORITHM": "legacy-v2"}
    with pytest.raises(client.RotatorError) as caught:
        client.run(["generate", "ssh"], env, 0)
    assert caught.value.code == client.EXIT_ENVIRONMENT
    assert "use one of: knockd-rotator/1, legacy-v1, legacy-v3" in str(caught.value)


def v3_ports(secret, door, period_start, length, ports):
    """Knock Rotator 3.0.0: the sorted port list, indexed by v1's hash modulo its size."""
    return [ports[int(hashlib.sha256(f"{period_start}{door}{secret}{i}".encode())
                      .hexdigest()[:8], 16) % len(ports)] for i in range(1, length + 1)]


def generated(env, service, now):
    result = run_client("generate", service, "--format", "json", env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize("ports, modulo", [(None, None), ("4000-4999, 2100,60000-65535", "3")])
def test_legacy_v3_sequences(ports, modulo):
    """3.0.0's default list 2000-65536 (63 537 ports) and one of its own, with
    its PROTO_MODULO; a period that draws 65536 takes knockd-rotator/1's
    sequence, which a 3.0.0 client cannot send either (it stops)."""
    env = {"KNOCKD_ROTATOR_SECRET": "legacy-secret-1", "KNOCKD_ROTATOR_ALGORITHM": "legacy-v3",
           "KNOCKD_ROTATOR_PERIOD_MODULO": "60", "KNOCKD_ROTATOR_LENGTH": "10"}
    listed = list(range(2000, 65537))
    if ports:
        env["KNOCKD_ROTATOR_PORTS"] = ports
        listed = sorted(list(range(4000, 5000)) + [2100] + list(range(60000, 65536)))
    if modulo:
        env["KNOCKD_ROTATOR_PROTO_MODULO"] = modulo
    settings = generator.read_settings(env, "ssh_ROTATOR")
    assert settings.port_modulo == int(modulo or 0)
    fallbacks = 0
    for start in range(0, 60 * 3000, 60):
        expected = v3_ports("legacy-secret-1", "ssh_ROTATOR", start, 10, listed)
        got = settings.generate(b"legacy-secret-1", "ssh_ROTATOR", start, 10,
                                settings.port_modulo)
        if max(expected) > 65535:
            fallbacks += 1
            assert got == client.generate_sequence(b"legacy-secret-1", "ssh_ROTATOR", start,
                                                   10, settings.port_modulo)
        else:
            assert [port for port, _ in got] == expected
            assert [proto for _, proto in got] == [
                "tcp" if not modulo or port % int(modulo) == 0 else "udp" for port in expected]
    assert not ports or fallbacks == 0
    assert 0 <= fallbacks < 10


def test_legacy_v3_client_and_server_agree(tmp_path, server_env):
    config = tmp_path / "knockd.conf"
    config.write_bytes(b"[ssh_ROTATOR]\n\tsequence = 1\n\tstop_command = true\n")
    legacy = dict(ALGORITHM="legacy-v3", SECRET=None, SALT="legacy-secret-1",
                  PERIOD_MODULO=31622400, PROTO_MODULO=2)
    result = run_server("--config", config, env=server_env(**legacy))
    assert result.returncode == 0, result.stderr
    assert "is read only" not in result.stderr, "SALT and PROTO_MODULO are read"
    assert "legacy-v3 door [ssh_ROTATOR] has a secret of less than 128 bits" in result.stderr
    held = knockd_config.door_sequences(knockd_config.parse_config(config.read_bytes()))["ssh_ROTATOR"]
    env = {"KNOCKD_ROTATOR_%s" % key: str(value) for key, value in legacy.items()
           if value is not None}
    start = int(time.time()) // 31622400 * 31622400
    ports = v3_ports("legacy-secret-1", "ssh_ROTATOR", start, 10, list(range(2000, 65537)))
    if max(ports) <= 65535:
        assert held.decode() == ",".join(
            "%d:%s" % (port, "tcp" if port % 2 == 0 else "udp") for port in ports)
    assert generated(env, "ssh", time.time())["sequence"] == held.decode()


def test_salt_is_read_for_legacy_doors_only(capsys):
    """v1.0.1 read its secret from KNOCKD_ROTATOR_SALT."""
    salt = {"KNOCKD_ROTATOR_SALT": "legacy-secret-1", "KNOCKD_ROTATOR_ALGORITHM": "legacy-v1"}
    secret = {"KNOCKD_ROTATOR_SECRET": "legacy-secret-1", "KNOCKD_ROTATOR_ALGORITHM": "legacy-v1"}
    assert client.run(["generate", "ssh"], salt, 1700000000) == 0
    assert client.run(["generate", "ssh"], secret, 1700000000) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == out[1]
    with pytest.raises(client.RotatorError) as caught:
        client.run(["generate", "ssh"], {"KNOCKD_ROTATOR_SALT": "x" * 40}, 1700000000)
    assert "KNOCKD_ROTATOR_SECRET is set" in str(caught.value)


@pytest.mark.parametrize("variable, words", [
    ("KNOCKD_ROTATOR_PROTO_MODULO", "read only by legacy-v3 doors (KNOCKD_ROTATOR_ALGORITHM); "
                                    "knockd-rotator/1 reads KNOCKD_ROTATOR_PORT_MODULO"),
    ("KNOCKD_ROTATOR_PORTS", "read only by legacy-v3 doors"),
    ("KNOCKD_ROTATOR_SALT_SSH", "read only by legacy-v1 and legacy-v3 doors"),
    ("KNOCKD_ROTATOR_LENGHT", "is no setting of knockd-rotator (a typo?)"),
])
def test_unread_variables_are_reported_by_both_scripts(tmp_path, server_env, variable, words):
    value = "2000-3000" if variable == "KNOCKD_ROTATOR_PORTS" else "2"
    env = {variable: value}
    client_result = run_client("generate", "ssh", env=dict(rotator_env(), **env))
    assert client_result.returncode == 0
    assert client_result.stderr.startswith("warning: %s is " % variable), client_result.stderr
    assert words in client_result.stderr and client_result.stderr.count("\n") == 1
    env_file = tmp_path / "rotator.env"
    env_file.write_text("%s=%s\n" % (variable, value))
    env_file.chmod(0o600)
    config = tmp_path / "knockd.conf"
    config.write_bytes(b"[ssh_ROTATOR]\n\tsequence = 1\n\tstop_command = true\n")
    config.chmod(0o600)
    for args in (["check"], []):
        result = run_server(*args, "--config", config, env=server_env(ENV_FILE=env_file))
        assert result.returncode == 0, result.stderr
        assert "warning: %s" % variable in result.stderr and words in result.stderr, \
            result.stderr
    legacy = run_client("generate", "ssh", env=dict(
        rotator_env(ALGORITHM="legacy-v3"), **env))
    assert legacy.returncode == 0, legacy.stderr
    assert (variable in legacy.stderr) == (variable == "KNOCKD_ROTATOR_LENGHT"), legacy.stderr
