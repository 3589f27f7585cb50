"""``finetune``: a fine-tuning corpus on every Debian/Ubuntu + Python install that leaves out the
texts ``looplm bench pretrained`` and ``bench convert`` evaluate on.

It is the standard library's Python source (as ``stdlib``) plus the English text found beside it:
the stdlib's own ``.rst`` and ``.txt`` files (e.g. ``email/architecture.rst``) and the license
texts in ``/usr/share/common-licenses`` (Apache-2.0, the BSD, Artistic, GFDL, LGPL and MPL
texts, GPL-1 and GPL-2). Left out: the held-out evaluation texts, ``GPL-3`` (and ``GPL``, a link
to it) and the stdlib's ``pprint.py``. Both are left out of the file list, not only of the split.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

from looplm.data.sources import FileEntry, FileSource
from looplm.data.stdlib import stdlib_files, stdlib_root

LICENSES = Path("/usr/share/common-licenses")
HELD_OUT_LICENSES = {"GPL", "GPL-3"}  # the GPL-3 text: bench pretrained's English prose
HELD_OUT_STDLIB = {"pprint.py"}  # bench pretrained's Python source
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def english_files(root: Path | None = None, licenses: Path = LICENSES) -> list[tuple[Path, str]]:
    """``(path, key)`` of the English text files: the stdlib's .rst/.txt and the license texts."""
    root = stdlib_root() if root is None else root
    out = []
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _SKIP_DIRS and not d.startswith(".")]
        out += [(Path(dirpath) / n, "stdlib/" + (Path(dirpath) / n).relative_to(root).as_posix())
                for n in files if n.endswith((".rst", ".txt"))]
    if licenses.is_dir():
        out += [(p, f"licenses/{p.name}") for p in licenses.iterdir()
                if p.is_file() and p.name not in HELD_OUT_LICENSES]
    return sorted(out, key=lambda pair: pair[1])


def finetune_source(max_files: int | None = None) -> FileSource:
    """The corpus as a ``FileSource``; Python files first, then the English texts."""
    code = [(p, key) for p, key in stdlib_files() if key not in HELD_OUT_STDLIB]
    files = (code + english_files())[:max_files]
    version = f"{platform.python_implementation()}-{platform.python_version()}"
    return FileSource([FileEntry(p, key, explicit=False) for p, key in files], label=f"finetune-{version}",
                      salt=sys.version + "finetune")
