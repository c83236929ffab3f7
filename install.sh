#!/bin/sh
# knockd-rotator: install, or uninstall, on a Debian-like system (as root).
#
#   ./install.sh [install] [--engine knockd|nftables]
#                                     install (idempotent: run it again to update)
#   ./install.sh uninstall            remove what install added, keep the secret
#   ./install.sh uninstall --purge    also remove /etc/knockd_rotator.env (and
#                                     /etc/knockd_rotator.doors)
#   ./install.sh --help               this text
#
# Examples:
#   ./install.sh                      knockd rewrites its doors (the default engine)
#   ./install.sh --engine nftables    the kernel matches the knocks, in the
#                                     nftables table inet knockd_rotator; no knockd
#
# The engine is KNOCKD_ROTATOR_ENGINE in /etc/knockd_rotator.env: a new file
# gets the one asked for; an existing one keeps its own (an update needs no
# --engine), and --engine naming another one is refused with how to switch.
# --engine nftables also installs /etc/knockd_rotator.doors (an example,
# mode 0600, unless the file exists), the units' nftables drop-ins and
# knockd_rotator-nftables.service (the table at boot, before the network).
# `uninstall` also removes the table inet knockd_rotator, if loaded.
#
# DESTDIR=/some/root installs under that root instead of / (for packaging and
# tests); systemctl is then left alone, and so is the table, unless that
# root's environment file names the nftables engine.  The secret is made by
# Python's `secrets` straight into a file created with mode 0600; it is never
# printed, and an existing environment file is never overwritten.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
root=${DESTDIR:-}
sbin=$root/usr/local/sbin
bin=$root/usr/local/bin
# The client that /usr/local/bin runs, imported from here by a launcher, and
# the server's package, which the server in /usr/local/sbin imports.
lib=$root/usr/local/lib/knockd_rotator
package=knockd_rotator
units=$root/etc/systemd/system
env_file=$root/etc/knockd_rotator.env
state=$root/var/lib/knockd_rotator
scripts="knockd_rotator_server.py knockd_rotator_client.py"
unit_files="knockd_rotator.service knockd_rotator.timer knockd_rotator-watch.service knockd_rotator-knockd@.service"
# The files of the further knockd that add-client starts (docs/SCALE.md).
instances=$root/etc/knockd_rotator.d
# Debian's knockd.service gets a drop-in that restarts a knockd that died.
dropin_dir=$units/knockd.service.d
dropin=knockd_rotator.conf
# The nftables engine: the doors, the table's boot unit, and one drop-in
# (knockd_rotator.service.d/nftables.conf) for both rotator services.
doors_file=$root/etc/knockd_rotator.doors
boot_unit=knockd_rotator-nftables.service
nft_dropin=nftables.conf
nft_dropped="knockd_rotator.service knockd_rotator-watch.service"
# ... and one for nftables.service, whose start flushes the whole ruleset.
nft_host_dropin=$units/nftables.service.d
table="inet knockd_rotator"

systemctl_here() {
    if [ -z "$root" ] && command -v systemctl >/dev/null 2>&1; then
        systemctl "$@" || true
    fi
}

fail() {
    echo "error: $1" >&2
    exit 2
}

# The engine an environment file names (knockd when it names none).
engine_of() {
    engine=$(sed -n 's/^[[:space:]]*\(export[[:space:]]\{1,\}\)\{0,1\}KNOCKD_ROTATOR_ENGINE=//p' "$1" |
             tail -n 1 | tr -d "\"' \t\r")
    echo "${engine:-knockd}"
}

# Whether the table is loaded, in this network namespace.
table_loaded() {
    command -v nft >/dev/null 2>&1 && nft list table $table >/dev/null 2>&1
}

install_nftables() {
    install -m 0644 "$here/$boot_unit" "$units/$boot_unit"
    for unit in $nft_dropped; do
        install -d -m 0755 "$units/$unit.d"
        install -m 0644 "$here/knockd_rotator.service.d/$nft_dropin" "$units/$unit.d/$nft_dropin"
    done
    install -d -m 0755 "$nft_host_dropin"
    install -m 0644 "$here/nftables.service.d/$dropin" "$nft_host_dropin/$dropin"
    if [ -e "$doors_file" ]; then
        echo "kept $doors_file"
    else
        install -m 0600 "$here/knockd_rotator.doors" "$doors_file"
        echo "created $doors_file (mode 0600; its example door is commented out)"
    fi
    if [ -z "$root" ] && ! command -v nft >/dev/null 2>&1; then
        echo "warning: the nftables engine needs nft: apt-get install nftables"
    fi
}

# Back to knockd (or never nftables): no nftables unit or drop-in may stay.
remove_nftables_units() {
    if [ -e "$units/$boot_unit" ]; then
        systemctl_here disable --now "$boot_unit"
    fi
    rm -f "$units/$boot_unit"
    for unit in $nft_dropped; do
        rm -f "$units/$unit.d/$nft_dropin"
        rmdir "$units/$unit.d" 2>/dev/null || true
    done
    rm -f "$nft_host_dropin/$dropin"
    rmdir "$nft_host_dropin" 2>/dev/null || true
}

# uninstall: the guard goes, and with it the ports go back to the host's
# firewall alone.  Under DESTDIR only for a root whose engine is nftables.
remove_table() {
    if [ -n "$root" ] && { [ ! -e "$env_file" ] || [ "$(engine_of "$env_file")" != nftables ]; }; then
        return
    fi
    if table_loaded; then
        nft delete table $table
        echo "removed the nftables table $table: its ports are now what your firewall allows"
    fi
}

install_all() {
    install -d -m 0755 "$sbin" "$bin" "$units" "$root/etc"
    for script in $scripts; do
        install -m 0755 "$here/$script" "$sbin/$script"
    done
    # Python compiles a script it runs anew at every start (5 ms, a sixth of
    # a knock), but caches the bytecode of a module it imports: the client
    # on the PATH is a launcher that imports the compiled client.
    install -d -m 0755 "$lib"
    install -m 0644 "$here/knockd_rotator_client.py" "$lib/knockd_rotator_client.py"
    python3 -m py_compile "$lib/knockd_rotator_client.py"
    # Anew, so that a module an update removed does not stay behind.
    rm -rf "${lib:?}/$package"
    (cd "$here" && find "$package" -name '*.py') | while read -r module; do
        install -D -m 0644 "$here/$module" "$lib/$module"
    done
    python3 -m compileall -q "$lib/$package"
    cat >"$bin/knockd_rotator_client.py" <<'LAUNCHER'
#!/usr/bin/env python3
"""knockd-rotator client launcher: runs ../lib/knockd_rotator/knockd_rotator_client.py,
the whole client in one file (copy that one, or /usr/local/sbin's, to a client)."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.realpath(__file__)), os.pardir, "lib",
                                "knockd_rotator"))
from knockd_rotator_client import main  # noqa: E402

sys.exit(main())
LAUNCHER
    chmod 0755 "$bin/knockd_rotator_client.py"
    for unit in $unit_files; do
        install -m 0644 "$here/$unit" "$units/$unit"
    done
    install -d -m 0755 "$dropin_dir"
    install -m 0644 "$here/knockd.service.d/$dropin" "$dropin_dir/$dropin"
    install -d -m 0700 "$instances"
    if [ -e "$env_file" ]; then
        echo "kept $env_file (never overwritten)"
        if [ -n "$(find "$env_file" -perm /077)" ]; then
            echo "warning: others can read $env_file: chmod 600 $env_file"
        fi
    else
        python3 - "$env_file" "$engine" <<'PYTHON'
import os, secrets, sys
descriptor = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
with os.fdopen(descriptor, "w") as handle:
    handle.write("# knockd-rotator settings (see docs/SETTINGS.md); keep this file mode 0600\n"
                 + ("KNOCKD_ROTATOR_ENGINE=%s\n" % sys.argv[2] if sys.argv[2] != "knockd" else "")
                 + "KNOCKD_ROTATOR_SECRET=%s\n" % secrets.token_urlsafe(32))
PYTHON
        echo "created $env_file (mode 0600) with a new secret$(
            [ "$engine" = knockd ] || echo " and KNOCKD_ROTATOR_ENGINE=$engine")"
    fi
    if [ "$engine" = nftables ]; then
        install_nftables
    else
        remove_nftables_units
        if table_loaded; then
            echo "warning: the nftables table $table is still loaded and nothing tops it up under the knockd engine: its doors stop opening when its windows run out; once knockd guards the ports: nft delete table $table"
        fi
    fi
    # knockd.conf holds the live sequences: Debian ships it readable by all.
    if [ -f "$root/etc/knockd.conf" ]; then
        chmod go-rwx "$root/etc/knockd.conf"
    fi
    systemctl_here daemon-reload
    cat <<NEXT
installed: $sbin/knockd_rotator_server.py (runs $lib/$package/),
           $sbin/knockd_rotator_client.py,
           $bin/knockd_rotator_client.py (runs $lib/knockd_rotator_client.py),
           $units/{$(echo $unit_files | tr ' ' ',')},
           $dropin_dir/$dropin (restarts knockd when it dies)
NEXT
    if [ "$engine" = nftables ]; then
        cat <<NEXT
           $units/$boot_unit (the table at boot, before the network),
           $units/{$(echo $nft_dropped | tr ' ' ',')}.d/$nft_dropin,
           $nft_host_dropin/$dropin (its start flushes the ruleset: the table follows)
next steps (nftables engine: the kernel matches the knocks, no knockd):
  1. keep a second way in (a console) until a client has logged in; your firewall
     must let the guarded port through (ufw allow 22/tcp): the table only drops
  2. add a door to $doors_file (ssh_ROTATOR guard=22), then
     knockd_rotator_server.py check
  3. systemctl enable --now $boot_unit   (loads the table, now and at every boot)
     systemctl enable --now knockd_rotator.timer  (tops it up; periods under an hour:
     systemctl enable --now knockd_rotator-watch.service instead)
  4. copy $sbin/knockd_rotator_client.py and the KNOCKD_ROTATOR_* lines of
     /etc/knockd_rotator.env to each client; knock (knock HOST ssh --check 22) and
     log in from a second terminal before you log out
NEXT
    else
        cat <<NEXT
next steps:
  1. add a door such as [ssh_ROTATOR] to /etc/knockd.conf (README, "The first door"; every firewall: docs/DOORS.md), then
     knockd_rotator_server.py check && knockd_rotator_server.py --dry-run
  2. systemctl enable --now knockd_rotator.timer && systemctl start knockd_rotator.service
     (or, for periods under an hour: systemctl enable --now knockd_rotator-watch.service)
  3. copy $sbin/knockd_rotator_client.py and the KNOCKD_ROTATOR_* lines of
     /etc/knockd_rotator.env to each client, and knock before you log out
NEXT
    fi
}

# A stop kills knockd's children that wait to run a door's stop_command (a
# door opened in the last cmd_timeout would stay open): wait for them first,
# 60 s at most.
stop_instance() {
    if [ -n "$root" ] || ! command -v systemctl >/dev/null 2>&1; then
        return
    fi
    pid=$(systemctl show --property=MainPID --value "$1" 2>/dev/null || echo 0)
    waited=0
    while [ "${pid:-0}" -gt 0 ] && pgrep -P "$pid" >/dev/null && [ $waited -lt 60 ]; do
        sleep 1
        waited=$((waited + 1))
    done
    systemctl disable --now "$1" || true
}

uninstall_all() {
    for unit in knockd_rotator.timer knockd_rotator.service knockd_rotator-watch.service; do
        systemctl_here disable --now "$unit"
    done
    remove_nftables_units
    # A boundary run the timer's service left (KillMode=process) outlives the
    # oneshot, and `stop` does not reach it: it would rotate once more and
    # make the state folder again.
    systemctl_here kill knockd_rotator.service
    # The further knockd go with their unit; their files stay, as knockd.conf does.
    for file in "$instances"/*.conf; do
        [ -e "$file" ] || continue
        stop_instance "knockd_rotator-knockd@$(basename "$file" .conf).service"
        echo "stopped knockd_rotator-knockd@$(basename "$file" .conf) (its doors stay in $file)"
    done
    for script in $scripts; do
        rm -f "$sbin/$script"
    done
    rm -f "$bin/knockd_rotator_client.py"
    rm -rf "$lib"
    for unit in $unit_files; do
        rm -f "$units/$unit"
    done
    rm -f "$dropin_dir/$dropin"
    rmdir "$dropin_dir" 2>/dev/null || true
    rm -rf "$state"
    systemctl_here daemon-reload
    # Last, once nothing is left to load it again.
    remove_table
    if [ "${1:-}" = "--purge" ]; then
        rm -f "$env_file" "$doors_file"
        rm -rf "$instances"
        echo "removed knockd-rotator, $env_file, $doors_file and $instances"
    else
        rmdir "$instances" 2>/dev/null || true
        echo "removed knockd-rotator; kept $env_file (./install.sh uninstall --purge removes it)"
    fi
}

usage="use: ./install.sh [install] [--engine knockd|nftables], ./install.sh uninstall [--purge], ./install.sh --help"
command=install
asked=""
case "${1:-}" in
    install|uninstall) command=$1; shift ;;
    -h|--help) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 0 ;;
esac
purge=""
while [ $# -gt 0 ]; do
    case "$command $1" in
        "install --engine") [ $# -ge 2 ] || fail "--engine needs a value: knockd or nftables ($usage)"
                            asked=$2; shift ;;
        "install --engine="*) asked=${1#--engine=}
                              [ -n "$asked" ] || fail "--engine needs a value: knockd or nftables ($usage)" ;;
        "uninstall --purge") purge=--purge ;;
        "uninstall "-*) fail "unknown option $1 (use: ./install.sh uninstall [--purge])" ;;
        *" "-*) fail "unknown option $1 ($usage)" ;;
        *) fail "unknown command $1 ($usage)" ;;
    esac
    shift
done
case "$asked" in
    ""|knockd|nftables) ;;
    *) fail "unknown engine '$asked' (use: --engine knockd or --engine nftables)" ;;
esac

if [ "$command" = uninstall ]; then
    uninstall_all "$purge"
    exit 0
fi
# The engine: the one asked for, else the environment file's, else knockd.
engine=${asked:-knockd}
if [ -e "$env_file" ]; then
    current=$(engine_of "$env_file")
    if [ -n "$asked" ] && [ "$asked" != "$current" ]; then
        fail "$env_file sets the $current engine, not $asked, and is never overwritten (to switch: set KNOCKD_ROTATOR_ENGINE=$asked in it$(
            [ "$asked" = nftables ] && echo ", write your doors into /etc/knockd_rotator.doors" ||
            echo ", put your doors into /etc/knockd.conf"), then run ./install.sh --engine $asked again; docs/OPERATIONS.md, \"The nftables engine\")"
    fi
    engine=$current
    case "$engine" in
        knockd|nftables) ;;
        *) fail "$env_file sets KNOCKD_ROTATOR_ENGINE=$engine (use: knockd or nftables)" ;;
    esac
fi
install_all
