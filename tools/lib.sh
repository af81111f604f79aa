# SPDX-License-Identifier: GPL-2.0
# Shared helpers for the workbench tools.  Sourced, never executed.
#
# Every tool keeps its state below one cache root, outside the repository:
#   $PFNMAP_CACHE            (default: ${XDG_CACHE_HOME:-$HOME/.cache}/pfnmap-series)
#     apt/                   private apt state used to download the base package
#     debs/                  downloaded linux-source .deb files (+ .sha256)
#     src/<pkg>_<version>/   extracted base tree, a git repo with one commit (tag "base")
#     worktrees/<name>/          git worktrees with a series applied
#     build/<name>/          kernel build directories (O=)
#     results/<name>/        KUnit logs, JSON and summaries

PROG=${PROG:-$(basename "$0")}
TOOLS=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# PFNMAP_TOP: where series/ and patches/ live (the repository; the tool
# self-tests point it at a scratch copy).
TOP=${PFNMAP_TOP:-$(cd "$TOOLS/.." && pwd)}
CACHE=${PFNMAP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/pfnmap-series}

die() {
	echo "$PROG: error: $*" >&2
	exit 1
}

warn() {
	echo "$PROG: warning: $*" >&2
}

info() {
	echo "$PROG: $*" >&2
}

# Loud notice: used when the tool does something other than what was asked
# (e.g. a pinned version is gone and a newer one is used).
loud() {
	{
		echo "$PROG: ************************************************************"
		echo "$PROG: NOTICE: $*"
		echo "$PROG: ************************************************************"
	} >&2
}

# series_file NAME -> path of series/NAME (dies with the list if unknown)
series_file() {
	local name=$1 f
	case "$name" in
	*/*) f=$name ;;
	*) f=$TOP/series/$name ;;
	esac
	if [ ! -f "$f" ]; then
		local known
		known=$(cd "$TOP/series" 2>/dev/null && ls | tr '\n' ' ')
		die "unknown series '$name' (no file $f; known series: ${known:-none})"
	fi
	echo "$f"
}

# series_header FILE KEY -> value of a "# KEY: value" header line
series_header() {
	sed -n "s/^#[[:space:]]*$2:[[:space:]]*//p" "$1" | head -n1 | sed 's/[[:space:]]*$//'
}

# series_patches FILE -> patch file names in order (quilt syntax: comments,
# blank lines and per-patch options such as -p1 are ignored)
series_patches() {
	grep -v '^[[:space:]]*#' "$1" | awk 'NF { print $1 }'
}

# is_kernel_tree DIR -> 0 if DIR looks like a Linux source tree
is_kernel_tree() {
	local d=$1
	[ -f "$d/Makefile" ] && grep -q '^VERSION = ' "$d/Makefile" &&
		[ -f "$d/Kconfig" ] && [ -d "$d/mm" ] && [ -f "$d/scripts/checkpatch.pl" ]
}

kernel_version_of() {
	local d=$1
	awk '/^VERSION =/{v=$3} /^PATCHLEVEL =/{p=$3} /^SUBLEVEL =/{s=$3}
	     /^EXTRAVERSION =/{e=$3} END{printf "%s.%s.%s%s\n", v, p, s, e}' "$d/Makefile"
}

# need_cmds CMD... -> die naming the Debian package for a missing command
need_cmds() {
	local c missing=()
	for c in "$@"; do
		command -v "$c" >/dev/null 2>&1 || missing+=("$c")
	done
	[ ${#missing[@]} -eq 0 ] && return 0
	die "missing command(s): ${missing[*]} (run 'make deps' or tools/deps to install them)"
}

# --- private apt state -------------------------------------------------------
# Packages that the machine's own suite lacks (base trees, a newer b4) are
# downloaded with a private apt state below the cache and a sources file
# built from the archive URI already configured in /etc/apt/sources*: the
# machine's own apt configuration is never changed.
#
# archive_uri WANT_SECURITY -> "URI<TAB>SUITES<TAB>KEY" of the first source
# that is (1) or is not (0) a *-security suite.  Both deb822 (.sources) and
# one-line (sources.list) formats are read; PFNMAP_APT_ETC replaces /etc/apt.
archive_uri() {
	local want_security=$1 f
	local etc=${PFNMAP_APT_ETC:-/etc/apt}
	{
		for f in "$etc"/sources.list.d/*.sources; do
			[ -f "$f" ] || continue
			awk -v RS= '{
				uri=""; suites=""; key=""
				n=split($0, L, "\n")
				for (i=1;i<=n;i++) {
					if (L[i] ~ /^URIs:/)      { sub(/^URIs:[ \t]*/, "", L[i]); uri=L[i] }
					if (L[i] ~ /^Suites:/)    { sub(/^Suites:[ \t]*/, "", L[i]); suites=L[i] }
					if (L[i] ~ /^Signed-By:/) { sub(/^Signed-By:[ \t]*/, "", L[i]); key=L[i] }
					if (L[i] ~ /^Types:/ && L[i] !~ /deb( |$)/) { uri="" }
				}
				split(uri, U, " ")
				if (U[1] != "") print U[1] "\t" suites "\t" key
			}' "$f"
		done
		for f in "$etc"/sources.list "$etc"/sources.list.d/*.list; do
			[ -f "$f" ] || continue
			awk '$1=="deb" {
				key=""; i=2
				if ($2 ~ /^\[/) { while ($i !~ /\]$/) { if ($i ~ /signed-by=/) key=$i; i++ }
				                  if ($i ~ /signed-by=/) key=$i; i++ }
				sub(/.*signed-by=/, "", key); sub(/\]$/, "", key)
				print $i "\t" $(i+1) "\t" key
			}' "$f"
		done
	} | awk -F'\t' -v sec="$want_security" '
		{ s = ($2 ~ /-security/) }
		s == sec && !done { print; done = 1 }'
}

# private_apt SUITE: set APT_DIR, APT_OPTS, APT_URI and APT_KEY for a
# private apt state of SUITE ($CACHE/apt/SUITE).
private_apt() {
	APT_SUITE=$1
	local is_sec=0 line
	case "$APT_SUITE" in *-security) is_sec=1 ;; esac
	line=$(archive_uri $is_sec || true)
	APT_URI=$(printf '%s' "$line" | cut -f1)
	APT_KEY=$(printf '%s' "$line" | cut -f3)
	[ -z "$APT_KEY" ] && APT_KEY=/usr/share/keyrings/debian-archive-keyring.gpg
	APT_DIR=$CACHE/apt/$APT_SUITE
	mkdir -p "$APT_DIR/lists/partial" "$APT_DIR/cache/archives/partial" "$APT_DIR/parts" "$APT_DIR/prefs"
	APT_OPTS=(
		-o "Dir::State=$APT_DIR"
		-o "Dir::State::Lists=$APT_DIR/lists"
		-o "Dir::State::status=$APT_DIR/status"
		-o "Dir::Cache=$APT_DIR/cache"
		-o "Dir::Etc::SourceList=$APT_DIR/sources.list"
		-o "Dir::Etc::SourceParts=$APT_DIR/parts"
		-o "Dir::Etc::Preferences=$APT_DIR/prefs/none"
		-o "Dir::Etc::PreferencesParts=$APT_DIR/prefs"
		-o "APT::Sandbox::User=root"
		-o "Debug::NoLocking=1"
		-o "APT::Architecture=amd64"
		-o "Acquire::Languages=none"
	)
	: >"$APT_DIR/status"
}

# private_apt_update PKG HINT: refresh the package list of the private state
# (private_apt first); PKG names what it is for, HINT what to do when the
# archive cannot be reached.
private_apt_update() {
	local pkg=$1 hint=$2 suite=$APT_SUITE
	[ -n "$APT_URI" ] || die "no Debian archive URI found in /etc/apt/sources.list or /etc/apt/sources.list.d/*.sources (needed to download $pkg from suite $suite)"
	echo "deb [signed-by=$APT_KEY] $APT_URI $suite main" >"$APT_DIR/sources.list"
	info "refreshing the package list of suite '$suite' (private apt state in $APT_DIR)"
	if ! apt-get "${APT_OPTS[@]}" -q update >"$APT_DIR/update.log" 2>&1; then
		sed 's/^/  apt: /' "$APT_DIR/update.log" | tail -n 8 >&2
		die "cannot reach the Debian archive for suite '$suite' (the URI configured in /etc/apt/sources*); $hint"
	fi
	# apt-get update exits 0 when it cannot fetch an index: it only warns.
	if grep -qE 'Failed to fetch|Could not connect|Could not resolve|Temporary failure resolving|Unable to connect' "$APT_DIR/update.log"; then
		grep -E '^(W|E): ' "$APT_DIR/update.log" | sed 's/^/  apt: /' >&2
		die "cannot reach the Debian archive for suite '$suite' (the URI configured in /etc/apt/sources*); $hint"
	fi
	if grep -qE '^(W|E): ' "$APT_DIR/update.log"; then
		grep -E '^(W|E): ' "$APT_DIR/update.log" | sed 's/^/  apt: /' >&2
		if grep -q '^E: ' "$APT_DIR/update.log"; then
			die "apt could not read suite '$suite' from the archive"
		fi
	fi
}

# private_apt_versions PKG -> the versions of PKG in the private state,
# newest first
private_apt_versions() {
	apt-cache "${APT_OPTS[@]}" madison "$1" 2>/dev/null | awk -F'|' '{gsub(/ /,"",$2); print $2}' |
		sort -u | python3 -c '
import sys, subprocess, functools
vs = [l.strip() for l in sys.stdin if l.strip()]
def cmp(a, b):
    if a == b: return 0
    return -1 if subprocess.call(["dpkg", "--compare-versions", a, "lt", b]) == 0 else 1
for v in sorted(vs, key=functools.cmp_to_key(cmp), reverse=True): print(v)'
}

# private_apt_download PKG VERSION DEST: download PKG=VERSION with the private
# state, check its sha256 against the archive's Packages entry, move it to
# DEST and record the hash in DEST.sha256.
private_apt_download() {
	local pkg=$1 ver=$2 dest=$3 got want have
	rm -f "$APT_DIR/cache/archives/"*.deb
	(cd "$APT_DIR/cache/archives" && exec apt-get "${APT_OPTS[@]}" -q download "$pkg=$ver") \
		>"$APT_DIR/download.log" 2>&1 &
	progress "downloading $pkg=$ver" "$APT_DIR/download.log" $! || {
		sed 's/^/  apt: /' "$APT_DIR/download.log" | tail -n 8 >&2
		die "apt-get download $pkg=$ver failed"
	}
	got=$(ls "$APT_DIR/cache/archives/"*.deb 2>/dev/null | head -n1)
	[ -n "$got" ] || die "apt-get download reported success but left no .deb"
	# apt checked the file against the signed Release/Packages; check it again
	# against the Packages entry ourselves and record the hash for later reuse.
	want=$(apt-cache "${APT_OPTS[@]}" show "$pkg=$ver" | sed -n 's/^SHA256: //p' | head -n1)
	have=$(sha256sum "$got" | cut -d' ' -f1)
	[ -n "$want" ] && [ "$want" = "$have" ] ||
		die "checksum mismatch for $(basename "$got"): archive says '$want', file has '$have'"
	mkdir -p "$(dirname "$dest")"
	mv "$got" "$dest"
	(cd "$(dirname "$dest")" && sha256sum "$(basename "$dest")" >"$(basename "$dest").sha256")
	info "verified sha256 $have of $(basename "$dest")"
}

# --- one run per cache ---------------------------------------------------------
# Tools that change the cache (worktrees, build directories, results, the
# base trees) take its lock, $CACHE/.lock, for as long as they run.  A
# second run fails at once and says who holds it, instead of resetting a
# worktree under a build.  Children of the holder (tools/check running
# tools/kunit running tools/apply) see PFNMAP_LOCK_HELD naming the same
# cache and go on; the lock is a flock on a descriptor they inherit.
take_lock() {
	local real
	mkdir -p "$CACHE"
	real=$(cd "$CACHE" && pwd -P)
	[ "${PFNMAP_LOCK_HELD:-}" = "$real" ] && return 0
	need_cmds flock
	exec 9>>"$real/.lock"
	if ! flock -n 9; then
		die "another workbench run is using the cache $real ($(cat "$real/.lock.who" 2>/dev/null || echo 'holder unknown')); wait for it to end, or give this run its own cache with PFNMAP_CACHE=DIR"
	fi
	echo "pid $$, $PROG, since $(date -u +%H:%M:%S) UTC" >"$real/.lock.who"
	export PFNMAP_LOCK_HELD=$real
}

# progress LABEL LOG PID: until PID exits, report LABEL, the time elapsed
# and the last line of LOG: refreshed in place every 2 s on a terminal,
# as a line every 60 s otherwise (CI logs).  Returns PID's exit status.
progress() {
	local label=$1 log=$2 pid=$3 t0 now last tty=0 next=60 rc=0
	t0=$(date +%s)
	[ -t 2 ] && tty=1
	# A background job of a script ignores SIGINT: pass it on.
	# shellcheck disable=SC2064
	trap "kill $pid 2>/dev/null; exit 130" INT TERM
	while kill -0 "$pid" 2>/dev/null; do
		sleep 2
		now=$(($(date +%s) - t0))
		last=$(tail -n 1 "$log" 2>/dev/null | tr -d '\r' | cut -c1-70)
		if [ $tty = 1 ]; then
			printf '\r\033[K%s: %s %dm%02ds  %s' "$PROG" "$label" $((now / 60)) $((now % 60)) "$last" >&2
		elif [ $now -ge $next ]; then
			printf '%s: %s %dm%02ds  %s\n' "$PROG" "$label" $((now / 60)) $((now % 60)) "$last" >&2
			next=$((next + 60))
		fi
	done
	[ $tty = 1 ] && printf '\r\033[K' >&2
	trap - INT TERM
	wait "$pid" || rc=$?
	return $rc
}

# Fixed identity and dates so that the base commit and the applied series
# get the same commit ids on every machine.
export_git_identity() {
	export GIT_AUTHOR_NAME="pfnmap workbench" GIT_AUTHOR_EMAIL="workbench@pfnmap.invalid"
	export GIT_COMMITTER_NAME="pfnmap workbench" GIT_COMMITTER_EMAIL="workbench@pfnmap.invalid"
}

# kunit_fragments CONFIG [SERIES [ARCH]] -> the config fragments of a KUnit
# kernel of ARCH (default x86_64), one per line: the kunit/NAME.kunitconfig
# files that the header "kunit-configs: NAME..." of series/SERIES names
# (all of kunit/*.kunitconfig without that header), less those whose line
# "# arch: LIST" does not name ARCH; then the arch fragment
# (configs/lab.config on x86_64, where the KUnit kernel is also the lab
# guest; configs/ARCH.config elsewhere) and configs/CONFIG.config.
kunit_fragments() {
	local f names="" n arch=${3:-x86_64} list=()
	[ -n "${2:-}" ] && names=$(series_header "$(series_file "$2")" kunit-configs)
	if [ -n "$names" ]; then
		for n in $names; do
			f=$TOP/kunit/$n.kunitconfig
			[ -f "$f" ] || die "series/$2: kunit-configs names '$n', but there is no kunit/$n.kunitconfig"
			list+=("$f")
		done
	else
		list=("$TOP"/kunit/*.kunitconfig)
	fi
	for f in "${list[@]}"; do
		n=$(series_header "$f" arch)
		if [ -n "$n" ] && ! [[ " $n " == *" $arch "* ]]; then
			continue
		fi
		echo "$f"
	done
	if [ "$arch" = x86_64 ]; then
		echo "$TOP/configs/lab.config"
	else
		[ -f "$TOP/configs/$arch.config" ] || die "no configs/$arch.config for a KUnit kernel of $arch"
		echo "$TOP/configs/$arch.config"
	fi
	echo "$TOP/configs/$1.config"
}

# kernel_cc: set KCC to the CC= value for kernel builds, "ccache gcc" with
# the workbench's ccache below the cache when ccache is installed, else gcc.
# Call it directly, not in $(...): it exports the ccache settings.
kernel_cc() {
	KCC=gcc
	if command -v ccache >/dev/null 2>&1; then
		export CCACHE_DIR=${CCACHE_DIR:-$CACHE/ccache}
		export CCACHE_BASEDIR=$CACHE CCACHE_NOHASHDIR=1
		export CCACHE_MAXSIZE=${CCACHE_MAXSIZE:-8G}
		KCC="ccache gcc"
	fi
}

usage_error() {
	echo "$PROG: $*" >&2
	echo "Try '$PROG --help'." >&2
	exit 2
}
