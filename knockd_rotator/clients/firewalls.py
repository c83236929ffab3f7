"""The firewall commands of a client's door (iptables, nft, ufw)."""

import os
import sys

from knockd_rotator.core.commands import run_command
from knockd_rotator.core.errors import EXIT_ENVIRONMENT
from knockd_rotator.core.generator import RotatorError
from knockd_rotator.engines.knockd.config import one_line


FIREWALLS = {
    # --firewall: (program, start_command, stop_command, start_command_6,
    # stop_command_6); {program} is its path, {set} the list or set of the port,
    # {seconds} cmd_timeout.  Every hole expires by itself after cmd_timeout, so
    # that a knockd that dies (SIGKILL, a crash, a restart under systemd's
    # KillMode=mixed) and never runs stop_command leaves no port open:
    # iptables: the admin's `-m recent --rcheck --seconds N` rule accepts an
    # address written to the kernel's recent list; one list holds both families.
    "iptables": ("iptables", "echo +%IP% > /proc/net/xt_recent/{set}",
                 "echo -%IP% > /proc/net/xt_recent/{set}",
                 "echo +%IP% > /proc/net/xt_recent/{set}",
                 "echo -%IP% > /proc/net/xt_recent/{set}"),
    # nftables: elements with a timeout, in one set per family (a set holds
    # one address type) of the admin's `inet filter` table.
    "nftables": ("nft", "{program} add element inet filter {set} {{ %IP% timeout {seconds}s }}",
                 "{program} delete element inet filter {set} {{ %IP% }}",
                 "{program} add element inet filter {set}_6 {{ %IP% timeout {seconds}s }}",
                 "{program} delete element inet filter {set}_6 {{ %IP% }}"),
    # ufw has no rule that expires: only stop_command closes it.  `prepend`
    # (ufw 0.36), not `insert 1`, which fails for an IPv6 rule placed before
    # IPv4 ones, and on an empty ruleset.
    "ufw": ("ufw", "{program} prepend allow from %IP% to any port {port} proto tcp",
            "{program} delete allow from %IP% to any port {port} proto tcp",
            "{program} prepend allow from %IP% to any port {port} proto tcp",
            "{program} delete allow from %IP% to any port {port} proto tcp"),
}
FIREWALL_PACKAGES = {"iptables": "iptables", "nft": "nftables", "ufw": "ufw"}
# The door: a knock must be done within SEQ_TIMEOUT s; the client then has
# CMD_TIMEOUT s to connect before the stop_command closes the port again.
CLIENT_SEQ_TIMEOUT = 15
CLIENT_CMD_TIMEOUT = 30


def nft_set(port):
    """The nftables set (IPv4; + "_6" for IPv6) and the iptables recent list of PORT."""
    return "knockd_rotator_%d" % port


def firewall_rules(firewall, port, seconds):
    """The rules the admin adds once for a door of FIREWALL on PORT: they
    accept what the door lets in, for SECONDS, and drop the port otherwise,
    on IPv4 and IPv6."""
    name = nft_set(port)
    if firewall == "iptables":
        return ["%s -I INPUT -p tcp --dport %d -j DROP" % (program, port)
                for program in ("iptables", "ip6tables")] + [
            "%s -I INPUT -p tcp --dport %d -m recent --name %s --rcheck --seconds %d -j ACCEPT"
            % (program, port, name, seconds) for program in ("iptables", "ip6tables")]
    if firewall == "nftables":
        return ["nft add set inet filter %s '{ type ipv4_addr; flags timeout; }'" % name,
                "nft add set inet filter %s_6 '{ type ipv6_addr; flags timeout; }'" % name,
                "nft insert rule inet filter input tcp dport %d drop" % port,
                "nft insert rule inet filter input ip6 saddr @%s_6 tcp dport %d accept"
                % (name, port),
                "nft insert rule inet filter input ip saddr @%s tcp dport %d accept"
                % (name, port)]
    return []


def door_commands(firewall, program, port, seconds):
    """(start_command, stop_command, start_command_6, stop_command_6) of a
    FIREWALL door on PORT whose holes last SECONDS; PROGRAM is the path."""
    fields = dict(program=program, port=port, set=nft_set(port), seconds=seconds)
    return tuple(command.format(**fields) for command in FIREWALLS[firewall][1:])


def firewall_commands(firewall, port, environ):
    """(start_command, stop_command, start_command_6, stop_command_6) of a
    client door, with the program's full path."""
    import shutil
    program = FIREWALLS[firewall][0]
    path = shutil.which(program, path=environ.get("PATH", os.defpath))
    if not path:
        raise RotatorError("%s is not installed (no %s in PATH)" % (firewall, program),
                           "install it: apt install %s; or choose another --firewall"
                           % FIREWALL_PACKAGES[program], EXIT_ENVIRONMENT)
    one_line("the path of %s, %r," % (program, path), path,
             "give PATH folders without one", EXIT_ENVIRONMENT)
    rules = "; ".join(firewall_rules(firewall, port, CLIENT_CMD_TIMEOUT))
    if firewall == "nftables":
        # A door whose set is missing, or has no timeouts, opens nothing.
        for name in (nft_set(port), nft_set(port) + "_6"):
            listing = "%s list set inet filter %s" % (path, name)
            ok, detail = run_command(listing)
            what = "does not exist (%s)" % detail
            if ok and not run_command(listing + " | grep -qw timeout")[0]:
                ok, what = False, "has no flags timeout: its holes would not close themselves"
            if not ok:
                raise RotatorError(
                    "the nftables set inet filter %s %s" % (name, what),
                    "create both sets (with flags timeout) and the rules, in /etc/nftables.conf "
                    "too: " + rules, EXIT_ENVIRONMENT)
    elif firewall == "iptables" and not os.path.exists("/proc/net/xt_recent/" + nft_set(port)):
        # Only a warning: the list appears with the rule, which may come later
        # (at boot, from a saved ruleset); until then the door opens nothing.
        print("warning: there is no iptables recent list %s yet: the door opens nothing "
              "until you add the rules (once, and to your saved ruleset): %s"
              % (nft_set(port), rules), file=sys.stderr)
    return door_commands(firewall, path, port, CLIENT_CMD_TIMEOUT)
