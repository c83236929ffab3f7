"""The README's first command, ./demo.sh, works and leaves nothing behind."""

import os
import re
import subprocess

import pytest

from conftest import ROOT, need_root_and


def namespaces():
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


@pytest.mark.knockd
def test_demo_runs_end_to_end(tmp_path):
    """As a fresh root shell runs it: umask 022, and a home the demo must
    leave alone (the client's counters stay in the demo's own folder)."""
    need_root_and("knockd", "iptables", "nft", "ip")
    before = namespaces()
    home = tmp_path / "home"
    home.mkdir()
    result = subprocess.run([str(ROOT / "demo.sh")], capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, HOME=str(home)),
                            preexec_fn=lambda: os.umask(0o022))
    assert list(home.iterdir()) == []
    assert "warning" not in result.stderr, result.stderr
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "port 2222 on 127.0.0.1 open after" in out
    assert "port 2222: closed again" in out
    assert "alice: port 2222 on 127.0.0.1 open after" in out
    # Within the server's lead before a boundary, the sibling opens.
    assert re.search(r"alice_ssh_ROTATOR(_GRACE)?: OPEN SESAME", out)
    # The nftables engine: the table guards, the knock opens, a replay does not.
    nft = out[out.index("== 7. the nftables engine"):]
    assert "table inet knockd_rotator" in nft
    assert "port 2222: closed (the table drops it)" in nft
    assert "nftables: port 2222 on 127.0.0.1 open after" in nft
    assert "replay from 127.0.0.2: port 2222 shut" in nft
    assert "nftables: port 2222 closed again" in nft
    assert "status: KNOCKD_ROTATOR OK" in nft, nft
    assert out.rstrip().endswith("the temp files are removed")
    assert "krdemo-" not in namespaces().replace(before, "")
