"""The one seam through which kata-vfio starts other programs.

modprobe, modinfo, lsinitrd, an inner runtime's delete, dracut: all go through
`run()`, never with a shell. A failure becomes a `CommandError` whose one line
names the program, what it was for and the last thing it said on stderr.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping, Sequence

from kata_vfio.errors import KataVfioError


class CommandError(KataVfioError):
    """A program kata-vfio ran is missing, failed or hung."""


def _last_words(text: str | None, limit: int = 300) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    tail = lines[-1] if lines else ""
    return tail if len(tail) <= limit else tail[:limit] + "…"


def run(
    argv: Sequence[str],
    *,
    what: str,
    env: Mapping[str, str] | None = None,
    timeout: float | None = 120,
    check: bool = True,
    capture: bool = True,
    input: str | None = None,
    cwd: str | None = None,
    hint: str = "",
) -> subprocess.CompletedProcess[str]:
    """Run argv (what = the step, e.g. "loading vfio-pci"); text is decoded leniently.

    `capture=False` leaves stdin/stdout/stderr to the caller's (an inner runtime
    talks to its user directly). `check=False` returns whatever the exit code was.
    """
    program = os.path.basename(argv[0])
    try:
        done = subprocess.run(
            list(argv),
            env=None if env is None else dict(env),
            timeout=timeout,
            capture_output=capture,
            text=True,
            encoding="utf-8",
            errors="replace",
            input=input,
            cwd=cwd,
            check=False,
        )
    except FileNotFoundError:
        raise CommandError(
            f"{what}: {program} not found", hint or f"install {program} or put it on PATH"
        ) from None
    except PermissionError:
        raise CommandError(
            f"{what}: {argv[0]} is not executable", hint or f"check the permissions of {argv[0]}"
        ) from None
    except subprocess.TimeoutExpired:
        raise CommandError(
            f"{what}: {program} did not finish within {timeout:g} s",
            hint or f"run it by hand: {' '.join(argv)}",
        ) from None
    if check and done.returncode != 0:
        said = _last_words(done.stderr) or _last_words(done.stdout)
        raise CommandError(
            f"{what}: {program} exited with {done.returncode}" + (f": {said}" if said else ""),
            hint or f"run it by hand to see more: {' '.join(argv)}",
        )
    return done
