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


def stable_patches(path):
    """The patches of a series meant for stable kernels, in series order:
    those with a 'Cc: stable@vger.kernel.org' line, and the earlier
    patches that such a line names as a prerequisite, in the
    stable-kernel-rules form 'Cc: stable@vger.kernel.org # 6.12.x: <subject>'."""
    patches = series_patches(path)
    text = {p: open(os.path.join(TOP, 'patches', p), errors='replace').read()
            for p in patches}
    fixes = {p for p in patches if STABLE_RE.search(text[p])}
    named = {m.group(1).strip() for p in fixes for m in STABLE_RE.finditer(text[p])
             if m.group(1)}
    prereq = {p for p in patches
              if patch_subject(os.path.join(TOP, 'patches', p)) in named}
    return [p for p in patches if p in fixes or p in prereq]


if __name__ == '__main__':
    import sys
    # python3 tools/pfnmap_series.py stable SERIES_FILE
    if len(sys.argv) == 3 and sys.argv[1] == 'stable':
        print('\n'.join(stable_patches(sys.argv[2])))
    else:
        sys.exit('usage: pfnmap_series.py stable SERIES_FILE')
