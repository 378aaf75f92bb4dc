#!/usr/bin/env bash
# Build, once per machine, a Debian root holding another line of RabbitMQ, for tests that
# run a private node of it beside the machine's own RabbitMQ (tests/privatenode.py runs it
# with unshare + chroot; nothing in the root is ever started by this script).
#
#   scripts/rabbitmq-root.sh SUITE   prints the root's path, building it first if needed
#
# SUITE is a Debian suite: trixie (Debian 13: RabbitMQ 4.0) or sid (unstable: today's
# RabbitMQ, 4.3 in December 2026; sid moves, so the root records the version it got, and
# the tests print it). The root lives outside the repository, at
# $FIBRPC_RABBITMQ_ROOTS/rabbitmq-SUITE-root (default folder /var/lib/fibrpc). It is built into a temporary folder beside it and
# renamed into place only once complete, so an interrupted build is never taken for a
# finished one. Packages come from the Debian mirror this machine's apt already uses
# ($FIBRPC_DEBIAN_MIRROR overrides it). Takes ~40 s and ~370 MB once; then < 1 s.
# Needs root (debootstrap). Progress goes to stderr; the build's full output is kept in
# ROOT.build.log and its tail printed if the build fails.
set -euo pipefail

SUITE=${1:-}
case $SUITE in
    trixie|sid) ;;
    *) printf 'usage: %s trixie|sid\n' "$0" >&2; exit 2 ;;
esac
ROOT=${FIBRPC_RABBITMQ_ROOTS:-/var/lib/fibrpc}/rabbitmq-$SUITE-root
MARKER=.fibrpc-rabbitmq-root   # written last, inside the root, before the rename

complete() { [[ -f $1/$MARKER && -x $1/usr/lib/rabbitmq/bin/rabbitmq-server ]]; }

# The quick path: nothing to do.
if complete "$ROOT"; then
    printf '%s\n' "$ROOT"
    exit 0
fi

say() { printf 'rabbitmq-root: %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }

[[ $(id -u) == 0 ]] || die "must run as root (debootstrap and chroot need it)"
case $ROOT in /*) ;; *) die "FIBRPC_RABBITMQ_ROOTS must be an absolute path, not '$ROOT'" ;; esac
ROOT=${ROOT%/}
[[ -n $ROOT && $ROOT != / ]] || die "refusing to use / as the root"

# The mirror apt uses for this machine's own release (not -security/-updates, not third
# party repositories): deb822 .sources files first, then one-line .list files.
debian_mirror() {
    local codename
    # shellcheck source=/dev/null
    codename=$(. /etc/os-release && printf '%s' "${VERSION_CODENAME:-}")
    local files=()
    shopt -s nullglob
    files=(/etc/apt/sources.list.d/*.sources /etc/apt/sources.list /etc/apt/sources.list.d/*.list)
    shopt -u nullglob
    local f
    for f in "${files[@]}"; do
        [[ -f $f ]] || continue
        if [[ $f == *.sources ]]; then
            # Paragraphs separated by blank lines; fields Types, URIs, Suites, Enabled.
            awk -v want="$codename" '
                function flush() {
                    if (types ~ /(^|[ \t])deb([ \t]|$)/ && enabled !~ /^[ \t]*no/ &&
                        (" " suites " ") ~ ("[ \t]" want "[ \t]") && uris != "") {
                        split(uris, u, /[ \t]+/); print u[1]; found = 1; exit
                    }
                    types = uris = suites = enabled = ""
                }
                /^[ \t]*#/ { next }
                /^[ \t]*$/ { flush(); next }
                tolower($1) == "types:"   { sub(/^[^:]*:[ \t]*/, ""); types = $0 }
                tolower($1) == "uris:"    { sub(/^[^:]*:[ \t]*/, ""); uris = $0 }
                tolower($1) == "suites:"  { sub(/^[^:]*:[ \t]*/, ""); suites = $0 }
                tolower($1) == "enabled:" { sub(/^[^:]*:[ \t]*/, ""); enabled = tolower($0) }
                END { if (!found) flush() }
            ' "$f"
        else
            # deb [options] URI SUITE COMPONENTS...
            sed -e 's/#.*//' -e 's/\[[^]]*\]//' "$f" |
                awk -v want="$codename" '$1 == "deb" && $3 == want { print $2; exit }'
        fi
    done | head -n 1
}

MIRROR=${FIBRPC_DEBIAN_MIRROR:-$(debian_mirror)}
MIRROR=${MIRROR%/}
[[ -n $MIRROR ]] || die "could not find the Debian mirror apt uses in /etc/apt/sources.list* (set FIBRPC_DEBIAN_MIRROR)"

if ! command -v debootstrap >/dev/null && [[ ! -x /usr/sbin/debootstrap ]]; then
    say "installing debootstrap with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends debootstrap >&2 ||
        { apt-get update >&2 && apt-get install -y --no-install-recommends debootstrap >&2; } ||
        die "could not install debootstrap"
fi
DEBOOTSTRAP=$(command -v debootstrap || echo /usr/sbin/debootstrap)

PARENT=$(dirname "$ROOT")
mkdir -p "$PARENT"
LOG=$ROOT.build.log

# One build at a time (parallel test workers may all ask at once); the others wait here
# and then find the root built.
exec 9>"$ROOT.lock"
if ! flock -n 9; then
    say "another build of $ROOT is running; waiting for it"
    flock 9
fi
if complete "$ROOT"; then
    printf '%s\n' "$ROOT"
    exit 0
fi

# Remove a folder of ours, but never through something mounted inside it.
remove_tree() {
    local dir=$1
    [[ -e $dir ]] || return 0
    if awk -v d="$dir" '$5 == d || index($5, d "/") == 1 { found = 1 } END { exit !found }' \
        /proc/self/mountinfo; then
        die "$dir has file systems mounted inside it; unmount them (see /proc/self/mountinfo) and run again"
    fi
    rm -rf --one-file-system -- "$dir"
}

# Leftovers of interrupted builds (we hold the lock, so none is in progress), and an
# incomplete root.
for old in "$ROOT".build.*/ "$ROOT".old.*/; do
    [[ -d $old ]] && { say "removing leftover ${old%/}"; remove_tree "${old%/}"; }
done
if [[ -e $ROOT ]]; then
    say "$ROOT is incomplete (no $MARKER); rebuilding it"
    aside=$ROOT.old.$$
    mv -T -- "$ROOT" "$aside"
    remove_tree "$aside"
fi

BUILD=$(mktemp -d "$ROOT.build.XXXXXX")
chmod 755 "$BUILD"
cleanup() {
    local code=$?
    if [[ $code != 0 && -d $BUILD ]]; then
        [[ -f $BUILD/debootstrap/debootstrap.log ]] &&
            { echo "--- $BUILD/debootstrap/debootstrap.log"; cat "$BUILD/debootstrap/debootstrap.log"; } >>"$LOG"
        remove_tree "$BUILD" || true
    fi
}
trap cleanup EXIT

say "building $ROOT: debootstrap $SUITE from $MIRROR (about 40 s, 370 MB); full output in $LOG"
started=$SECONDS
: >"$LOG"
# In a mount namespace of its own, so whatever debootstrap mounts (/proc, /sys in the
# target) goes away with it even if it is killed.
if ! unshare --mount --propagation private -- \
    "$DEBOOTSTRAP" --variant=minbase --include=rabbitmq-server \
    "$SUITE" "$BUILD" "$MIRROR" >>"$LOG" 2>&1; then
    [[ -f $BUILD/debootstrap/debootstrap.log ]] &&
        { echo "--- $BUILD/debootstrap/debootstrap.log"; cat "$BUILD/debootstrap/debootstrap.log"; } >>"$LOG"
    say "debootstrap failed; the end of its output ($LOG):"
    tail -n 60 "$LOG" >&2
    exit 1
fi

[[ -x $BUILD/usr/lib/rabbitmq/bin/rabbitmq-server ]] ||
    { tail -n 60 "$LOG" >&2; die "debootstrap finished but $BUILD has no rabbitmq-server"; }

# Small fixes for running a node in it: names for localhost (a minbase sid root has no
# /etc/hosts, and the node then fails to boot: epmd error for host localhost: nxdomain),
# no package cache.
grep -qs '^127\.0\.0\.1[[:space:]].*localhost' "$BUILD/etc/hosts" ||
    printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n' >>"$BUILD/etc/hosts"
rm -f "$BUILD"/var/cache/apt/archives/*.deb "$BUILD"/var/cache/apt/*.bin

version=$(sed -n 's/^Version: //p' <(awk '/^Package: rabbitmq-server$/,/^$/' "$BUILD/var/lib/dpkg/status"))
printf 'suite=%s\nmirror=%s\nrabbitmq-server=%s\nbuilt=%s\n' \
    "$SUITE" "$MIRROR" "$version" "$(date -u +%FT%TZ)" >"$BUILD/$MARKER"
sync -f "$BUILD/$MARKER" 2>/dev/null || true
mv -T -- "$BUILD" "$ROOT"
trap - EXIT
say "built $ROOT (rabbitmq-server $version) in $((SECONDS - started)) s"
printf '%s\n' "$ROOT"
