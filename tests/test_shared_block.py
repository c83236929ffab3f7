"""The generator block is byte-identical in the client and the server's package."""

import ast
import re

from conftest import CLIENT, ROOT

# The server's copy: the module of its package that holds the generator.
SERVER_GENERATOR = ROOT / "knockd_rotator" / "core" / "generator.py"

MARKERS = re.compile(rb"^# BEGIN SHARED GENERATOR\n.*?^# END SHARED GENERATOR\n", re.S | re.M)


def shared_block(path):
    blocks = MARKERS.findall(path.read_bytes())
    assert len(blocks) == 1, "%s needs exactly one shared block" % path.name
    return blocks[0]


def test_blocks_are_byte_identical():
    assert shared_block(CLIENT) == shared_block(SERVER_GENERATOR)


def test_block_is_pure():
    """No clock, no environment, no I/O, no imports inside the shared block."""
    tree = ast.parse(shared_block(CLIENT).decode())
    names = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    attributes = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    assert not names & {"time", "os", "sys", "open", "print", "input", "socket"}
    assert not attributes & {"environ", "time", "now"}
    assert not [node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))]
