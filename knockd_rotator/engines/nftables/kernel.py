"""The nftables engine's I/O: a Load in (netlink.py's batch, then one `nft
-f` transaction); the burned uses, the doors' counters and the table's
state back."""

import json
import subprocess
import sys
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

def table_state(netns=None):
    """The table's TableState, or None when there is no table (not
    installed, or removed).  Read over netlink: nft 1.0.6 fetches every
    set's elements before it lists a rule or a counter (7.5 s at 10,000
    doors, for the 0.09 s this takes).  Raises OSError when the kernel
    refuses (not root)."""
    try:
        netlink.request(netlink.NFT_MSG_GETTABLE, [(netlink.TABLE_NAME, netlink.name(TABLE))],
                        dump=False, netns=netns)
        cohorts = set()
        for chain in ("root4", "root6"):
            for rule in netlink.request(netlink.NFT_MSG_GETRULE, [
                    (netlink.RULE_TABLE, netlink.name(TABLE)),
                    (netlink.RULE_CHAIN, netlink.name(chain))], netns=netns):
                span = _root_span(rule.get(netlink.RULE_EXPRESSIONS, b""))
                if span:
                    cohorts.add(span)
        counters = {netlink.string(answer.get(netlink.OBJ_NAME, b"")): int.from_bytes(
            netlink.attributes(answer.get(netlink.OBJ_DATA, b"")).get(
                netlink.COUNTER_PACKETS, b""), "big")
            for answer in netlink.request(netlink.NFT_MSG_GETOBJ, [
                (netlink.OBJ_TABLE, netlink.name(TABLE)),
                (netlink.OBJ_TYPE, netlink.OBJECT_COUNTER.to_bytes(4, "big"))], netns=netns)}
        doors = {int.from_bytes(element[netlink.ELEM_KEY], sys.byteorder):
                 netlink.string(element.get(netlink.ELEM_OBJREF, b""))
                 for element in netlink.elements(TABLE, "opens", netns)}
        # A source's key: its address, then the port's mark (4 bytes).
        sources = {element[netlink.ELEM_KEY][:-4] for family in ("allow4", "allow6")
                   for element in netlink.elements(TABLE, family, netns)}
    except FileNotFoundError:
        return None              # no table, or removed while it was read
    return TableState(sorted(cohorts), {number: counters.get(name, 0)
                                        for number, name in sorted(doors.items())},
                      len(sources))


def _root_span(expressions):
    """(valid_from, valid_until) of a root chain's rule, from its `meta time`
    comparisons (in ns, big-endian once nft's byteorder expression turned
    them), or None for a rule with no such pair."""
    bounds, timed = {}, False
    for _, item in netlink.attribute_list(expressions):
        expression = netlink.attributes(item)
        kind = netlink.string(expression.get(netlink.EXPR_NAME, b""))
        data = netlink.attributes(expression.get(netlink.EXPR_DATA, b""))
        if kind == "meta":
            timed = data.get(netlink.META_KEY) == netlink.META_TIME_NS.to_bytes(4, "big")
        elif kind == "cmp" and timed:
            value = netlink.attributes(data.get(netlink.CMP_DATA, b"")).get(netlink.VALUE, b"")
            if len(value) == 8:
                bounds[int.from_bytes(data.get(netlink.CMP_OP, b""), "big")] = \
                    int.from_bytes(value, "big") // 10 ** 9
    if netlink.CMP_GTE in bounds and netlink.CMP_LT in bounds:
        return bounds[netlink.CMP_GTE], bounds[netlink.CMP_LT]
    return None


def remove(netns=None):
    """Delete the table if there is one (uninstall; nothing to do is fine):
    the open doors, the knocks in progress and the counters go with it."""
    apply(Load(remove_text(), {}), netns)
