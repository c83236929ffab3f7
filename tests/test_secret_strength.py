"""The 128-bit floor on secrets (issue 23, item 4): it counted length and
alphabet only, so 87 times `a` and `correcthorsebatterystaple` passed."""

import secrets

import knockd_rotator_client as client
from knockd_rotator.core import generator
from conftest import rotator_env, run_client, run_server

WEAK = ["a" * 87,                       # fewer than 6 different characters
        "ab" * 40 + "ccc",
        "Kx9-Qp2_" * 6,                 # a short secret written 6 times
        "correcthorsebatterystaple"]    # 25 lowercase letters: 117 bits
AT_THE_FLOOR = ["271828182845904523536028747135266249775",   # 39 decimal digits
                "0123456789abcdeffedcba9876543210",          # 32 hex digits
                "JBSWY3DPEHPK3PXPMZXW6YTBOI",                # 26 base32
                secrets.token_hex(16), secrets.token_urlsafe(17)]


def test_the_floor_refuses_the_obvious_and_passes_random_secrets(tmp_path, server_env):
    config = tmp_path / "knockd.conf"
    config.write_bytes(b"[ssh_ROTATOR]\n\tsequence = 1\n\tstop_command = true\n")
    for secret in WEAK:
        assert client.secret_bits(secret) == generator.secret_bits(secret) < 128, secret
        for result in (run_client("gen", "ssh", env=rotator_env(SECRET=secret)),
                       run_server("--config", config, env=server_env(SECRET=secret))):
            assert result.returncode == client.EXIT_ENVIRONMENT, (secret, result.stderr)
            assert "KNOCKD_ROTATOR_SECRET holds less than 128 bits" in result.stderr
            assert secret not in result.stdout + result.stderr
        assert config.read_bytes().startswith(b"[ssh_ROTATOR]\n\tsequence = 1\n")
    for secret in AT_THE_FLOOR:
        assert client.secret_bits(secret) >= 128, secret
        settings = client.read_settings({"KNOCKD_ROTATOR_SECRET": secret}, "ssh_ROTATOR")
        assert client.secret_bytes(settings) == secret.encode()
