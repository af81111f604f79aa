# SPDX-License-Identifier: GPL-2.0
"""Series files, shared by the Python tools (tools/lib.sh does the same for
the shell tools): series/NAME lists patch files of patches/ in quilt syntax
-- comments, blank lines, and per-patch options after the name."""

import glob
import os
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

TOOLS = os.path.dirname(os.path.abspath(__file__))
# PFNMAP_TOP: where series/ and patches/ live (tools/selftest uses a scratch copy)
TOP = os.environ.get('PFNMAP_TOP') or os.path.dirname(TOOLS)


def series_files() -> List[str]:
    """Paths of all series files, sorted."""
    return sorted(f for f in glob.glob(os.path.join(TOP, 'series', '*'))
                  if os.path.isfile(f))


def series_patches(path: str) -> List[str]:
    """Patch file names listed in a series file, in order."""
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith('#'):
                out.append(line.split()[0])
    return out


def series_header(path: str, key: str) -> str:
    """Value of a '# KEY: value' header line of a series file, or ''."""
    with open(path) as f:
        for line in f:
            m = re.match(r'#\s*' + re.escape(key) + r':\s*(.*?)\s*$', line)
            if m:
                return m.group(1)
    return ''


def header_of(text: str, name: str) -> str:
    """A header of a mail or git format-patch text, unfolded ('' if absent)."""
    head = text.split('\n\n', 1)[0]
    m = re.search(r'^' + re.escape(name) + r': (.*(?:\n[ \t].*)*)', head, re.M)
    return re.sub(r'\s*\n[ \t]+', ' ', m.group(1)).strip() if m else ''


def patch_subject(path: str) -> str:
    """The subject of a git format-patch file, unfolded, without [PATCH]."""
    with open(path, errors='replace') as f:
        subj = header_of(f.read(), 'Subject')
    return re.sub(r'^\[[^\]]*\]\s*', '', subj)


def has_history(tree: str, rev: str = 'HEAD') -> bool:
    """Whether @rev of the git tree has a parent: a base made from a Debian
    tarball is one commit, where no Fixes: sha can be looked up."""
    import subprocess
    r = subprocess.run(['git', '-C', tree, 'rev-list', '--count', '--max-count=2', rev],
                       capture_output=True, text=True)
    return r.returncode == 0 and r.stdout.strip() not in ('', '0', '1')


STABLE_RE = re.compile(r'^Cc: stable@vger\.kernel\.org(?:\s*#\s*(?:[^:]*:\s*)?(.*))?$',
                       re.M)


STABLE_FROM_RE = re.compile(r'^Cc: stable@vger\.kernel\.org\s*#\s*(\d+)\.(\d+)\.x\b', re.M)


def version_key(version: Optional[str]) -> Optional[Tuple[int, int]]:
    """(major, minor) of an upstream or Debian version string: '7.2.13-1'
    and '7.2' give (7, 2); None if there is none."""
    m = re.match(r'(\d+)\.(\d+)', version or '')
    return (int(m.group(1)), int(m.group(2))) if m else None


def stable_from(text: str) -> Optional[Tuple[int, int]]:
    """The oldest stable series a patch asks for ('# 7.3.x' in all its
    'Cc: stable' lines), or None when any of them names no version."""
    lines = STABLE_RE.findall(text)
    vers = [(int(a), int(b)) for a, b in STABLE_FROM_RE.findall(text)]
    return min(vers) if vers and len(vers) == len(lines) else None


def stable_patches(path: str, version: Optional[str] = None) -> List[str]:
    """The patches of a series meant for stable kernels, in series order:
    those with a 'Cc: stable@vger.kernel.org' line, and the earlier
    patches that such a line names as a prerequisite, in the
    stable-kernel-rules form 'Cc: stable@vger.kernel.org # 6.12.x: <subject>'.
    With @version ('7.2.13'), leave out the patches whose every stable line
    asks for a later series only ('# 7.3.x'): they need a backport."""
    patches = series_patches(path)
    text = {p: open(os.path.join(TOP, 'patches', p), errors='replace').read()
            for p in patches}
    fixes = {p for p in patches if STABLE_RE.search(text[p])}
    want = version_key(version)
    if want is not None:
        upto: Tuple[int, int] = want

        def wanted(p: str) -> bool:
            since = stable_from(text[p])
            return since is None or since <= upto
        fixes = {p for p in fixes if wanted(p)}
    named = {m.group(1).strip() for p in fixes for m in STABLE_RE.finditer(text[p])
             if m.group(1)}
    prereq = {p for p in patches
              if patch_subject(os.path.join(TOP, 'patches', p)) in named}
    return [p for p in patches if p in fixes or p in prereq]


def load_kunit_tool(kunit_dir: Optional[str], prog: str = 'lab-report') -> Tuple[Any, Any]:
    """kunit_tool's parser and printer modules from a kernel tree's
    tools/testing/kunit; exits with a message naming the directory if it
    has none."""
    import sys
    if not kunit_dir or not os.path.isfile(os.path.join(kunit_dir, 'kunit_parser.py')):
        sys.exit(f'{prog}: error: no kunit_tool in {kunit_dir!r} '
                 '(give --kunit-dir TREE/tools/testing/kunit)')
    sys.path.insert(0, kunit_dir)
    try:
        import kunit_parser
        import kunit_printer
    except ImportError as e:
        sys.exit(f'{prog}: error: cannot import kunit_tool from {kunit_dir}: {e}')
    return kunit_parser, kunit_printer


def parse_run_tests(kunit_parser: Any, kunit_printer: Any, lines: List[str]) -> Any:
    """kunit_parser.parse_run_tests() of any supported tree's kunit_tool,
    without printing: 7.x's takes a printer; 6.12's takes none and prints
    through kunit_printer.stdout, which is pointed at a sink meanwhile."""
    import inspect
    import io
    if 'printer' in inspect.signature(kunit_parser.parse_run_tests).parameters:
        return kunit_parser.parse_run_tests(
            lines, kunit_printer.Printer(print=True, output=io.StringIO()))
    out = kunit_printer.stdout
    saved = out._output
    out._output = io.StringIO()
    try:
        return kunit_parser.parse_run_tests(lines)
    finally:
        out._output = saved


# --- the registry of fixes and mutants (kunit/mutants) ----------------------------

MUTANT_ARCHES = ('x86_64', 'arm64', 'lab')


class Mutant:
    """A line of kunit/mutants: series[:kind] | name | patches | globs [| extras].
    kind is the arch of a KUnit mutant (x86_64, the default, or arm64), or
    "lab": the mutant kernel of tools/lab (globs "-": the lab's checks say
    what must fail, tools/lab.d/expect)."""

    def __init__(self, series: str, kind: str, name: str, without: List[str], globs: List[str],
                 extras: List[str], line: int) -> None:
        self.series = series
        self.kind = kind
        self.name = name
        self.without = without
        self.globs = globs
        self.extras = extras
        self.line = line

    def args(self) -> List[str]:
        """tools/apply and tools/kunit options that build this mutant."""
        out = []
        for w in self.without:
            out += ['--without', w]
        for x in self.extras:
            out += ['--extra', os.path.join(TOP, x)]
        return out


def read_mutants(path: Optional[str] = None) -> List['Mutant']:
    """The lines of kunit/mutants as Mutant objects; ValueError names a bad line."""
    path = path or os.path.join(TOP, 'kunit', 'mutants')
    out: List[Mutant] = []
    if not os.path.exists(path):
        return out
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith('#'):
                continue
            parts = [x.strip() for x in line.split('|')]
            if len(parts) not in (4, 5):
                raise ValueError(f'kunit/mutants:{n}: want "series[:kind] | name | patches | '
                                 'tests [| extra patches]"')
            series, _, kind = parts[0].partition(':')
            kind = kind or 'x86_64'
            if kind not in MUTANT_ARCHES:
                raise ValueError(f'kunit/mutants:{n}: unknown kind {kind!r} '
                                 f'({", ".join(MUTANT_ARCHES)})')
            def split(s: str) -> List[str]:
                return [x.strip() for x in s.split(',') if x.strip() and x.strip() != '-']
            out.append(Mutant(series, kind, parts[1], split(parts[2]), split(parts[3]),
                              split(parts[4]) if len(parts) == 5 else [], n))
    return out


def find_mutant(series: str, name: str, kind: str = 'x86_64') -> Mutant:
    """The registry line of mutant @name of @series, or LookupError."""
    for m in read_mutants():
        if m.series == series and m.name == name and m.kind == kind:
            return m
    raise LookupError(f'kunit/mutants has no line "{series}{":" + kind if kind != "x86_64" else ""}'
                      f' | {name} | ..."')


# --- one run per cache (tools/lib.sh take_lock, for the Python tools) ----------

_LOCK_FD: Optional[int] = None


def take_lock(cache: str, prog: str) -> None:
    """Take the cache's lock for the life of this process, as take_lock in
    tools/lib.sh does; exits with a message naming the holder when another
    run has it.  A no-op in a child of the holder (PFNMAP_LOCK_HELD)."""
    import fcntl
    import sys
    import time
    global _LOCK_FD
    os.makedirs(cache, exist_ok=True)
    real = os.path.realpath(cache)
    if os.environ.get('PFNMAP_LOCK_HELD') == real or _LOCK_FD is not None:
        return
    fd = os.open(os.path.join(real, '.lock'), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        try:
            who = open(os.path.join(real, '.lock.who')).read().strip()
        except OSError:
            who = 'holder unknown'
        sys.exit(f'{prog}: error: another workbench run is using the cache {real} ({who}); '
                 'wait for it to end, or give this run its own cache with PFNMAP_CACHE=DIR')
    os.set_inheritable(fd, True)
    _LOCK_FD = fd
    with open(os.path.join(real, '.lock.who'), 'w') as f:
        f.write(f'pid {os.getpid()}, {prog}, since {time.strftime("%H:%M:%S", time.gmtime())} UTC\n')
    os.environ['PFNMAP_LOCK_HELD'] = real


# --- results as data -----------------------------------------------------------
# Every tool that checks something writes its results as JSON:
#   {"tool": NAME, "cases": [{"name": ..., "status": "pass"|"fail"|"skip",
#                             "detail": ...}, ...]}
# tools/check passes each tool the file (--results FILE) and reads it back;
# a step whose file is missing or unreadable counts as one failure.

STATUSES = ('pass', 'fail', 'skip')


def write_results(path: str, tool: str, cases: Sequence[Tuple[str, str, str]]) -> None:
    """Write @cases, a list of (status, name, detail), to @path."""
    import json
    rows = []
    for status, name, detail in cases:
        if status not in STATUSES:
            raise ValueError(f'{tool}: unknown status {status!r} for {name!r}')
        rows.append({'name': name, 'status': status, 'detail': detail})
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = f'{path}.tmp{os.getpid()}'
    with open(tmp, 'w') as f:
        json.dump({'tool': tool, 'cases': rows}, f, indent=1)
        f.write('\n')
    os.replace(tmp, path)


def read_results(path: str) -> Tuple[int, int, int, List[Dict[str, str]]]:
    """(passed, failed, skipped, cases) of a results file written by
    write_results(); raises OSError/ValueError when it is missing or bad."""
    import json
    with open(path) as f:
        data = json.load(f)
    cases = data['cases']
    count = {s: 0 for s in STATUSES}
    for c in cases:
        if c.get('status') not in STATUSES:
            raise ValueError(f'{path}: bad status in {c!r}')
        count[c['status']] += 1
    return count['pass'], count['fail'], count['skip'], cases


def _main(argv: List[str]) -> int:
    import sys
    # python3 tools/pfnmap_series.py stable SERIES_FILE [VERSION]
    if len(argv) in (3, 4) and argv[1] == 'stable':
        print('\n'.join(stable_patches(argv[2], *argv[3:])))
        return 0
    # python3 tools/pfnmap_series.py results FILE TOOL < "status<TAB>name<TAB>detail" lines
    if len(argv) == 4 and argv[1] == 'results':
        cases = []
        for line in sys.stdin:
            line = line.rstrip('\n')
            if line:
                parts = line.split('\t', 2) + ['', '']
                cases.append((parts[0], parts[1], parts[2]))
        write_results(argv[2], argv[3], cases)
        return 0
    # python3 tools/pfnmap_series.py mutant-args SERIES NAME [KIND]: one option per line
    if len(argv) in (4, 5) and argv[1] == 'mutant-args':
        try:
            print('\n'.join(find_mutant(*argv[2:]).args()))
        except (LookupError, ValueError) as e:
            sys.stderr.write(f'pfnmap_series.py: error: {e}\n')
            return 1
        return 0
    sys.stderr.write('usage: pfnmap_series.py stable SERIES_FILE [VERSION]\n'
                     '       pfnmap_series.py mutant-args SERIES NAME [KIND]\n'
                     '       pfnmap_series.py results FILE TOOL < status<TAB>name<TAB>detail lines\n')
    return 2


if __name__ == '__main__':
    import sys
    sys.exit(_main(sys.argv))
