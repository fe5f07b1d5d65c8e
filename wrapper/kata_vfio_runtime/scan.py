"""Does this bundle need the VFIO edit at all? A look at the bytes, standard library only.

Most containers ask for no device. For them create/start should cost what a
passthrough verb costs, so before importing the settings, the ledger and the spec
editor we look for the only strings an edit can start from: ``vfio`` (a
``/dev/vfio`` entry, an ``io.kata-vfio.*`` annotation) and ``guest_hook_path`` (a
forged guest-hook annotation to remove). JSON may hide characters behind ``\\u``
escapes, so any backslash-u sends the bundle down the full path too, as does
anything unusual about the file: the full path then reports it properly.
"""

from __future__ import annotations

import os

_NEEDLES = (b"vfio", b"guest_hook_path", b"\\u")
_LIMIT = 16 << 20


def needs_edit(bundle: str) -> bool:
    try:
        fd = os.open(os.path.join(bundle, "config.json"), os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return True
    try:
        st = os.fstat(fd)
        if (st.st_mode & 0o170000) != 0o100000 or st.st_size > _LIMIT:
            return True
        data = os.read(fd, st.st_size + 1)
        while len(data) <= st.st_size:
            more = os.read(fd, st.st_size + 1 - len(data))
            if not more:
                break
            data += more
    except OSError:
        return True
    finally:
        os.close(fd)
    lowered = data.lower()
    return any(needle in lowered for needle in _NEEDLES)
