"""docs/SPEC.md's test vectors, checked against the shared generator and
against a second implementation written from the SPEC's text alone."""

import hashlib
import hmac
import json
import re
import struct

import pytest

import knockd_rotator_client as client
from conftest import ROOT

FIELDS = ("secret", "door", "now", "period", "offset", "length", "port_modulo",
          "period_start", "sequence")


def spec_vectors(kind, fields, plain=("sequence",)):
    """The vectors titled `### KIND n: ...` in docs/SPEC.md: FIELDS in order,
    JSON values but for the PLAIN fields."""
    text = (ROOT / "docs" / "SPEC.md").read_text(encoding="utf-8")
    vectors = []
    for title, body in re.findall(r"### (%s \d+[^\n]*)\n\n```\n(.*?)```" % kind, text, re.S):
        values = dict(line.split(None, 1) for line in body.splitlines())
        assert tuple(values) == fields, title
        vector = {k: v.strip() if k in plain else json.loads(v) for k, v in values.items()}
        vectors.append(pytest.param(vector, id=title))
    return vectors


def independent_sequence(secret, door, now, period, offset, length, port_modulo):
    """Steps 1-4 of docs/SPEC.md, written from the text, sharing no code.
    SECRET is text, or the key's bytes (step 0)."""
    key = secret if isinstance(secret, bytes) else secret.encode("utf-8")
    start = (now // period + offset) * period
    door_bytes = door.encode("utf-8")
    prefix = (struct.pack(">I", 16) + b"knockd-rotator/1" + struct.pack(">I", len(door_bytes))
              + door_bytes + struct.pack(">q", start))
    ports, k = [], 0
    while True:
        block = hmac.new(key, prefix + struct.pack(">I", k),
                         hashlib.sha256).digest()
        k += 1
        for (v,) in struct.iter_unpack(">H", block):
            if v >= 63536 or 2000 + v in ports:
                continue
            ports.append(2000 + v)
            if len(ports) == length:
                ascending = sorted(ports) == ports
                descending = sorted(ports, reverse=True) == ports
                if length >= 3 and (ascending or descending):
                    ports = []
                else:
                    return start, ",".join(
                        "%d:%s" % (p, "tcp" if port_modulo == 0 or p % port_modulo == 0 else "udp")
                        for p in ports)


VECTORS = spec_vectors("Vector", FIELDS)


def test_spec_has_the_required_coverage():
    vectors = [p.values[0] for p in VECTORS]
    assert len(vectors) >= 12
    assert {1, 32} <= {v["length"] for v in vectors}
    assert any(v["port_modulo"] == 0 for v in vectors) and any(v["port_modulo"] for v in vectors)
    assert any(v["offset"] < 0 for v in vectors) and any(v["offset"] > 0 for v in vectors)
    assert any(not v["door"].isascii() for v in vectors)
    assert any(len(v["door"]) > 100 for v in vectors)


@pytest.mark.parametrize("vector", VECTORS)
def test_vector_matches_shared_generator(vector):
    start = client.period_start(vector["now"], vector["period"], vector["offset"])
    assert start == vector["period_start"]
    sequence = client.generate_sequence(vector["secret"].encode("utf-8"), vector["door"], start,
                                        vector["length"], vector["port_modulo"])
    assert client.format_sequence(sequence) == vector["sequence"]


@pytest.mark.parametrize("vector", VECTORS)
def test_vector_matches_independent_implementation(vector):
    inputs = {k: vector[k] for k in FIELDS[:7]}
    assert independent_sequence(**inputs) == (vector["period_start"], vector["sequence"])


def test_worked_example_block():
    text = (ROOT / "docs" / "SPEC.md").read_text(encoding="utf-8")
    shown = re.search(r"block_0 = ([0-9a-f]{64})", text).group(1)
    message = (struct.pack(">I", 16) + b"knockd-rotator/1" + struct.pack(">I", 11)
               + b"ssh_ROTATOR" + struct.pack(">q", 1699984800) + struct.pack(">I", 0))
    assert hmac.new(b"example-secret-0123", message, hashlib.sha256).hexdigest() == shown


KEY_FIELDS = ("mode", "secret", "pin", "door", "now", "period", "length", "port_modulo", "code",
              "key", "period_start", "sequence")


KEY_VECTORS = spec_vectors("Key vector", KEY_FIELDS, plain=("key", "sequence"))


def independent_totp(base32_secret, counter):
    """RFC 4226 / 6238 from the RFC's text: HMAC-SHA1, dynamic truncation, 6 digits."""
    import base64
    digest = hmac.new(base64.b32decode(base32_secret), struct.pack(">Q", counter),
                      hashlib.sha1).digest()
    offset = digest[19] & 15
    return "%06d" % ((struct.unpack(">I", digest[offset:offset + 4])[0] & 0x7FFFFFFF) % 10 ** 6)


def independent_key(mode, secret, pin, door, code):
    """Step 0 of docs/SPEC.md, from the text."""
    if mode == "secret" and not pin:
        return secret.encode()
    tag = ("knockd-rotator/1 " + mode).encode()
    material = secret.encode() if mode == "secret" else code.encode()
    salt = b"".join(struct.pack(">I", len(f)) + f for f in (tag, door.encode(), material))
    return hashlib.pbkdf2_hmac("sha256", pin.encode(), salt, 20000, 32)


def test_key_vectors_cover_pins_and_totp():
    vectors = [p.values[0] for p in KEY_VECTORS]
    assert {v["mode"] for v in vectors} == {"secret", "totp"}
    assert any(v["pin"] and v["mode"] == "totp" for v in vectors)
    assert any(not v["pin"] and v["mode"] == "totp" for v in vectors)
    assert any(v["code"].startswith("0") for v in vectors)


@pytest.mark.parametrize("vector", KEY_VECTORS)
def test_key_vector_matches_independent_implementation(vector):
    start = vector["now"] // vector["period"] * vector["period"]
    assert start == vector["period_start"]
    if vector["mode"] == "totp":
        assert independent_totp(vector["secret"], start // 30) == vector["code"]
    key = independent_key(vector["mode"], vector["secret"], vector["pin"], vector["door"],
                          vector["code"])
    assert key.hex() == vector["key"]
    ports = independent_sequence(key, vector["door"], vector["now"],
                                 vector["period"], 0, vector["length"], vector["port_modulo"])
    assert ports == (start, vector["sequence"])


@pytest.mark.parametrize("vector", KEY_VECTORS)
def test_key_vector_matches_the_scripts(vector, capsys):
    """The server's settings, TOTP and key code, and the client's command line."""
    from knockd_rotator.core import generator as core_generator
    from knockd_rotator.core import settings as core_settings
    env = {"KNOCKD_ROTATOR_SECRET": vector["secret"], "KNOCKD_ROTATOR_MODE": vector["mode"],
           "KNOCKD_ROTATOR_PIN": vector["pin"], "KNOCKD_ROTATOR_LENGTH": str(vector["length"]),
           "KNOCKD_ROTATOR_PORT_MODULO": str(vector["port_modulo"])}
    if vector["mode"] == "secret":
        env["KNOCKD_ROTATOR_PERIOD_MODULO"] = str(vector["period"])
    settings = core_settings.with_sequences(core_generator.read_settings(env, vector["door"]))
    assert settings.sequence_at(vector["period_start"]).decode() == vector["sequence"]
    if vector["mode"] == "totp":
        del env["KNOCKD_ROTATOR_SECRET"]          # the client never has it
        argv = ["generate", vector["door"], "--code", vector["code"]]
    else:
        argv = ["generate", vector["door"]]
    assert client.run(argv, env, vector["now"]) == 0
    assert capsys.readouterr().out == vector["sequence"] + "\n"


USE_FIELDS = ("secret", "pin", "door", "now", "period", "length", "port_modulo", "use",
              "use_key", "period_start", "sequence")
USE_VECTORS = spec_vectors("Use vector", USE_FIELDS, plain=("use_key", "sequence"))


@pytest.mark.parametrize("vector", USE_VECTORS)
def test_use_vector_matches_independent_implementation_and_the_server(vector):
    """Single use, from the SPEC's text: use 0 keeps the key, use n > 0 is an
    HMAC of the tag and the counter under it."""
    from knockd_rotator.core import generator as core_generator
    from knockd_rotator.core import settings as core_settings
    key = independent_key("secret", vector["secret"], vector["pin"], vector["door"], "")
    if vector["use"]:
        key = hmac.new(key, b"knockd-rotator/1 use" + struct.pack(">I", vector["use"]),
                       hashlib.sha256).digest()
    assert key.hex() == vector["use_key"]
    assert independent_sequence(key, vector["door"], vector["now"], vector["period"], 0,
                                vector["length"], vector["port_modulo"]) == (
        vector["period_start"], vector["sequence"])
    env = {"KNOCKD_ROTATOR_SECRET": vector["secret"], "KNOCKD_ROTATOR_PIN": vector["pin"],
           "KNOCKD_ROTATOR_PERIOD_MODULO": str(vector["period"]),
           "KNOCKD_ROTATOR_SINGLE_USE": "1"}
    settings = core_settings.with_sequences(core_generator.read_settings(env, vector["door"]))
    assert settings.sequence_at(vector["period_start"], vector["use"]).decode() == \
        vector["sequence"]


def test_use_vectors_start_at_the_plain_sequence():
    vectors = [p.values[0] for p in USE_VECTORS]
    assert vectors[0]["use"] == 0 and vectors[0]["use_key"] == \
        vectors[0]["secret"].encode().hex()
    assert any(v["pin"] for v in vectors) and len({v["use"] for v in vectors}) >= 3


@pytest.mark.parametrize("vector", spec_vectors("Legacy vector", FIELDS))
def test_legacy_vector_matches_v1_rule_and_the_client(vector, capsys):
    from test_legacy import v1_ports
    start = vector["now"] // vector["period"] * vector["period"]
    assert start == vector["period_start"]
    ports = v1_ports(vector["secret"], vector["door"], start, vector["length"])
    modulo = vector["port_modulo"]
    assert vector["sequence"] == ",".join(
        "%d:%s" % (port, "tcp" if modulo == 0 or port % modulo == 0 else "udp")
        for port in ports)
    env = {"KNOCKD_ROTATOR_SECRET": vector["secret"], "KNOCKD_ROTATOR_ALGORITHM": "legacy-v1",
           "KNOCKD_ROTATOR_PERIOD_MODULO": str(vector["period"]),
           "KNOCKD_ROTATOR_LENGTH": str(vector["length"]),
           "KNOCKD_ROTATOR_PORT_MODULO": str(modulo)}
    assert client.run(["generate", vector["door"]], env, vector["now"]) == 0
    assert capsys.readouterr().out == vector["sequence"] + "\n"
