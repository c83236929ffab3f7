"""The nftables engine's I/O: one `nft -f` transaction in, the burned uses back."""

import json
import subprocess

from knockd_rotator.engines.nftables.ruleset import TABLE


def nft_command(netns=None):
    command = ["nft"]
    return (["ip", "netns", "exec", netns] + command) if netns else command


def apply(text, netns=None, check=False):
    """Load TEXT with one `nft -f -` (in network namespace NETNS, if given);
    CHECK: only `nft -c`.  Raises RuntimeError with nft's message on failure."""
    command = nft_command(netns) + (["-c"] if check else []) + ["-f", "-"]
    result = subprocess.run(command, input=text.encode(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    if result.returncode:
        raise RuntimeError("nft -f failed: %s" % result.stderr.decode("utf-8", "replace")[:2000])


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
