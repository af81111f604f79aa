# SPDX-License-Identifier: GPL-2.0
"""Series files, shared by the Python tools (tools/lib.sh does the same for
the shell tools): series/NAME lists patch files of patches/ in quilt syntax
-- comments, blank lines, and per-patch options after the name."""

import glob
import os

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
