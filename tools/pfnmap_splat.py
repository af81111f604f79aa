# SPDX-License-Identifier: GPL-2.0
"""Kernel reports (KASAN, lockdep, DEBUG_VM, WARN, Oops, ...) in a console
log: shared by tools/kunit-report and tools/lab-report."""
import re
from typing import List, Tuple

# The "cut here" line opens a WARN or a BUG(); the line after it says which.
CUT_HERE = 'WARN/BUG'

# A kernel report: the line that starts it.  Kept specific so that test
# names or KUnit diagnostics do not match by accident.
SPLAT_PATTERNS = [
    (r'BUG: KASAN: ', 'KASAN'),
    (r'BUG: KFENCE: ', 'KFENCE'),
    (r'UBSAN: ', 'UBSAN'),
    (r'WARNING: possible circular locking dependency', 'lockdep'),
    (r'WARNING: possible recursive locking detected', 'lockdep'),
    (r'WARNING: inconsistent lock state', 'lockdep'),
    (r'WARNING: suspicious RCU usage', 'lockdep/RCU'),
    (r'WARNING: lock held when returning to user space', 'lockdep'),
    (r'WARNING: bad unlock balance detected', 'lockdep'),
    (r'WARNING: held lock freed', 'lockdep'),
    (r'INFO: possible irq lock inversion', 'lockdep'),
    (r'DEBUG_LOCKS_WARN_ON', 'lockdep'),
    (r'BUG: sleeping function called from invalid context', 'might_sleep'),
    (r'BUG: scheduling while atomic', 'scheduling while atomic'),
    (r'BUG: spinlock ', 'spinlock debug'),
    (r'BUG: Bad page ', 'bad page'),
    (r'BUG: Bad rss-counter', 'bad rss-counter'),
    (r'BUG: non-zero pgtables_bytes', 'pgtable leak'),
    (r'page dumped because: ', 'DEBUG_VM page dump'),
    (r'vma .* dumped because', 'DEBUG_VM vma dump'),
    (r'mm .* dumped because', 'DEBUG_VM mm dump'),
    (r'kernel BUG at ', 'BUG'),
    (r'BUG: unable to handle ', 'Oops'),
    (r'Oops: ', 'Oops'),
    (r'general protection fault', 'GPF'),
    (r'WARNING: CPU: \d+ PID: \d+ at ', 'WARN'),
    (r'WARNING: at ', 'WARN'),
    # as v7.3 prints it: "WARNING: mm/foo.c:123 at func+0x1/0x2, CPU#0: comm/42"
    (r'WARNING: \S+:\d+ at \S+, CPU#\d+', 'WARN'),
    (r'------------\[ cut here \]------------', CUT_HERE),
    (r'Kernel panic - not syncing', 'panic'),
    (r'watchdog: BUG: soft lockup', 'soft lockup'),
    (r'rcu: INFO: .* detected stalls', 'RCU stall'),
    (r'INFO: task .* blocked for more than', 'hung task'),
    (r'refcount_t: ', 'refcount'),
    (r'list_(add|del) corruption', 'list corruption'),
    (r'BUG: workqueue leaked', 'workqueue'),
]
SPLAT_RE = [(re.compile(p), what) for p, what in SPLAT_PATTERNS]
TS_RE = re.compile(r'^\s*\[\s*(\d+\.\d+)\]\s?')


def find_splats(lines: List[str]) -> List[Tuple[int, str, List[str]]]:
    """Return [(line_no, kind, context_lines)] for every kernel report."""
    found = []
    skip_until = -1
    for i, line in enumerate(lines):
        if i <= skip_until:
            continue
        text = TS_RE.sub('', line)
        for rx, what in SPLAT_RE:
            if rx.search(text):
                if what == CUT_HERE:
                    what = cut_here_kind(lines[i + 1:i + 4])
                ctx = lines[max(0, i - 2):i + 25]
                found.append((i + 1, what, ctx))
                skip_until = i + 25
                break
    return found


def cut_here_kind(following: List[str]) -> str:
    """The kind of the report that a "cut here" line opens, from the
    lines after it: "kernel BUG at" makes it a BUG (a crash), a WARNING
    line a WARN.  A BUG() trace with KASAN runs far past 25 lines, so the
    "Oops" and "Kernel panic" lines after it would otherwise be skipped,
    or seen as a separate crash, and the report itself taken for a WARN."""
    for line in following:
        text = TS_RE.sub('', line)
        for rx, what in SPLAT_RE:
            if what != CUT_HERE and rx.search(text):
                return what
    return CUT_HERE
