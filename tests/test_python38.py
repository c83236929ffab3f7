"""Both scripts, and the server's package, run on Python 3.8: checked by vermin
(tests/run installs it)."""

import os
import shutil
import subprocess

from conftest import CLIENT, ROOT, SERVER, need


def vermin(*paths):
    program = os.environ.get("VERMIN_FOR_KNOCKD_ROTATOR_TESTS") or shutil.which("vermin")
    need(program, "needs vermin (tests/run installs it into a virtual environment)")
    return subprocess.run([program, "-t=3.8-", "--no-tips", "--violations"]
                          + [str(p) for p in paths], capture_output=True, text=True)


def test_scripts_need_nothing_newer_than_python_3_8():
    result = vermin(CLIENT, SERVER, ROOT / "knockd_rotator")
    assert result.returncode == 0, result.stdout + result.stderr


def test_vermin_would_catch_a_newer_construct(tmp_path):
    newer = tmp_path / "newer.py"
    newer.write_text("print('x'.removeprefix('y'))\n")        # Python 3.9
    result = vermin(newer)
    assert result.returncode != 0 and "removeprefix" in result.stdout
