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
