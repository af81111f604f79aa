# SPDX-License-Identifier: GPL-2.0
"""Series files, shared by the Python tools (tools/lib.sh does the same for
the shell tools): series/NAME lists patch files of patches/ in quilt syntax
-- comments, blank lines, and per-patch options after the name."""

import glob
import os
import re

TOOLS = os.path.dirname(os.path.abspath(__file__))
# PFNMAP_TOP: where series/ and patches/ live (tools/selftest uses a scratch copy)
TOP = os.environ.get('PFNMAP_TOP') or os.path.dirname(TOOLS)


def series_files():
    """Paths of all series files, sorted."""
    return sorted(f for f in glob.glob(os.path.join(TOP, 'series', '*'))
                  if os.path.isfile(f))


def series_patches(path):
    """Patch file names listed in a series file, in order."""
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith('#'):
                out.append(line.split()[0])
    return out


def series_header(path, key):
    """Value of a '# KEY: value' header line of a series file, or ''."""
    with open(path) as f:
        for line in f:
            m = re.match(r'#\s*' + re.escape(key) + r':\s*(.*?)\s*$', line)
            if m:
                return m.group(1)
    return ''


def patch_subject(path):
    """The subject of a git format-patch file, unfolded, without [PATCH]."""
    subj = None
    with open(path, errors='replace') as f:
        for line in f:
            if subj is not None:
                if line.startswith((' ', '\t')):
                    subj += ' ' + line.strip()
                    continue
                break
            if line.startswith('Subject: '):
                subj = line[len('Subject: '):].strip()
            elif not line.strip():
                break
    return re.sub(r'^\[[^\]]*\]\s*', '', subj or '')


STABLE_RE = re.compile(r'^Cc: stable@vger\.kernel\.org(?:\s*#\s*(?:[^:]*:\s*)?(.*))?$',
                       re.M)


STABLE_FROM_RE = re.compile(r'^Cc: stable@vger\.kernel\.org\s*#\s*(\d+)\.(\d+)\.x\b', re.M)


def version_key(version):
    """(major, minor) of an upstream or Debian version string: '7.2.13-1'
    and '7.2' give (7, 2); None if there is none."""
    m = re.match(r'(\d+)\.(\d+)', version or '')
    return (int(m.group(1)), int(m.group(2))) if m else None


def stable_from(text):
    """The oldest stable series a patch asks for ('# 7.3.x' in all its
    'Cc: stable' lines), or None when any of them names no version."""
    lines = STABLE_RE.findall(text)
    vers = [(int(a), int(b)) for a, b in STABLE_FROM_RE.findall(text)]
    return min(vers) if vers and len(vers) == len(lines) else None


def stable_patches(path, version=None):
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
    if want:
        fixes = {p for p in fixes
                 if not stable_from(text[p]) or stable_from(text[p]) <= want}
    named = {m.group(1).strip() for p in fixes for m in STABLE_RE.finditer(text[p])
             if m.group(1)}
    prereq = {p for p in patches
              if patch_subject(os.path.join(TOP, 'patches', p)) in named}
    return [p for p in patches if p in fixes or p in prereq]


if __name__ == '__main__':
    import sys
    # python3 tools/pfnmap_series.py stable SERIES_FILE [VERSION]
    if len(sys.argv) in (3, 4) and sys.argv[1] == 'stable':
        print('\n'.join(stable_patches(sys.argv[2], *sys.argv[3:])))
    else:
        sys.exit('usage: pfnmap_series.py stable SERIES_FILE [VERSION]')


def load_kunit_tool(kunit_dir, prog='lab-report'):
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


def parse_run_tests(kunit_parser, kunit_printer, lines):
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
