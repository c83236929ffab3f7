"""The nftables engine's I/O: a Load in (netlink.py's batch, then one `nft
-f` transaction); the burned uses, the doors' counters and the table's
state back."""

import calendar
import json
import os
import subprocess
import time
from collections import namedtuple

from knockd_rotator.engines.nftables import netlink
from knockd_rotator.engines.nftables.ruleset import Load, TABLE, remove_text


def nft_command(netns=None):
    command = ["nft"]
    return (["ip", "netns", "exec", netns] + command) if netns else command


def apply(load, netns=None, check=False):
    """Load LOAD (ruleset.render's): its staged elements over netlink, then
    its text with one `nft -f -` (in network namespace NETNS, if given);
    CHECK: only `nft -c` of the text.  Raises RuntimeError with the kernel's
    or nft's message on failure."""
    if not check:
        netlink.add_elements(TABLE, load.staged, netns)
    command = nft_command(netns) + (["-c"] if check else []) + ["-f", "-"]
    result = subprocess.run(command, input=load.text.encode(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    if result.returncode:
        raise RuntimeError("nft -f: %s" % result.stderr.decode("utf-8", "replace")[:2000])


def read_spent(netns=None):
    """`nft -j list set inet knockd_rotator spent`: the text for spent_uses."""
    result = subprocess.run(nft_command(netns) + ["-j", "list", "set", "inet", TABLE, "spent"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=True)
    return result.stdout.decode()


def _number(value):
    if isinstance(value, int):
        return value
    return int(value, 0) if isinstance(value, str) and value[:1].isdigit() else value


def spent_uses(json_text, ruleset):
    """The single-use windows the kernel burned: [(door name, start, use)],
    from the JSON of `read_spent` and the Ruleset that was loaded."""
    data = json.loads(json_text)
    burned = []
    for item in data.get("nftables", []):
        for element in item.get("set", {}).get("elem", []):
            value = element.get("elem", {}).get("val", element) if isinstance(element, dict) \
                else element
            parts = value.get("concat") if isinstance(value, dict) else None
            if not parts or len(parts) != 3:
                continue
            key = (_number(parts[0]), parts[1], _number(parts[2]))
            if key in ruleset.finals:
                burned.append(ruleset.finals[key])
    return sorted(burned)


TableState = namedtuple("TableState", "cohorts opens sources")
TableState.__doc__ = """What the kernel's table holds now, as plain data.

cohorts   [(valid_from, valid_until)]: the spans (UNIX seconds) in which a
          first knock finds a root, from the root chains' `meta time` rules
opens     {door number: packets}: the openings each door of the loaded plan
          counted (a door's counter survives top-ups and full loads)
sources   how many source addresses some door is open for now (allow4 and
          allow6: one address opened to several ports counts once)"""

# nft prints `meta time` as a date in the local time of its own process:
# in UTC it reads back unambiguously (no summer time).
NFT_ENV_TZ = "UTC0"
NFT_TIME_FORMAT = "%Y-%m-%d %H:%M:%S"


def table_state(netns=None):
    """The table's TableState from one `nft -j list table`, or None when
    there is no table (not installed, or removed)."""
    result = subprocess.run(nft_command(netns) + ["-j", "list", "table", "inet", TABLE],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ, TZ=NFT_ENV_TZ))
    if result.returncode:
        error = result.stderr.decode("utf-8", "replace")
        if "No such file or directory" in error:
            return None
        raise RuntimeError("nft list table failed: %s" % error[:2000])
    return parse_table_state(result.stdout.decode())


def remove(netns=None):
    """Delete the table if there is one (uninstall; nothing to do is fine):
    the open doors, the knocks in progress and the counters go with it."""
    apply(Load(remove_text(), {}), netns)


def _seconds(value):
    """A `meta time` operand: an integer, or a date as nft prints it in UTC."""
    if isinstance(value, int):
        return value
    return calendar.timegm(time.strptime(value, NFT_TIME_FORMAT))


def _root_span(rule):
    """(valid_from, valid_until) of a root chain's rule, from its `meta time`
    matches, or None for a rule with no such pair."""
    bounds = {}
    for expression in rule.get("expr", []):
        match = expression.get("match") if isinstance(expression, dict) else None
        if match and match.get("left") == {"meta": {"key": "time"}}:
            bounds[match.get("op")] = _seconds(match.get("right"))
    if ">=" in bounds and "<" in bounds:
        return bounds[">="], bounds["<"]
    return None


def _elements(items):
    """The keys of a set's or map's JSON elements (without timeouts)."""
    for element in items:
        if isinstance(element, dict) and "elem" in element:
            element = element["elem"].get("val")
        yield element


def parse_table_state(json_text):
    """The TableState in the text of `nft -j list table inet knockd_rotator`."""
    cohorts, counters, doors, sources = set(), {}, {}, set()
    for item in json.loads(json_text).get("nftables", []):
        kind, body = next(iter(item.items()))
        if kind == "rule" and body.get("chain") in ("root4", "root6"):
            span = _root_span(body)
            if span:
                cohorts.add(span)
        elif kind == "counter":
            counters[body.get("name")] = body.get("packets", 0)
        elif kind == "map" and body.get("name") == "opens":
            doors = {_number(number): name for number, name in _elements(body.get("elem", []))}
        elif kind == "set" and body.get("name") in ("allow4", "allow6"):
            for key in _elements(body.get("elem", [])):
                sources.add(key["concat"][0] if isinstance(key, dict) else key)
    return TableState(sorted(cohorts), {number: counters.get(name, 0)
                                        for number, name in sorted(doors.items())},
                      len(sources))
