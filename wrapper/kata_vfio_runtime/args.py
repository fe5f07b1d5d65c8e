"""Reading just enough of an OCI runtime command line to act on it.

The wrapper never rebuilds the command line: it finds the verb, the runtime log
and, for create/run, the bundle and container id, and hands the argv on as is.
"""

from __future__ import annotations

from kata_vfio.value import Value

# Global flags (runc, crun, Kata 1.x) that take a value in the `--flag value` form.
GLOBAL_VALUE_FLAGS = frozenset(
    {
        "--root",
        "--log",
        "--log-format",
        "--log-level",
        "--criu",
        "--kata-config",
        "--cgroup-manager",
    }
)
# runc's --rootless takes true|false|auto, but may also stand alone in other runtimes.
ROOTLESS_VALUES = frozenset({"true", "false", "auto"})

# Flags of create/run that take a value in the `--flag value` form.
CREATE_VALUE_FLAGS = frozenset(
    {"--bundle", "-b", "--console-socket", "--pid-file", "--preserve-fds", "--pidfd-socket"}
)

EDIT_VERBS = frozenset({"create", "run"})


class Invocation(Value):
    """What the wrapper needs to know of one runtime call."""

    verb: str | None
    log_path: str | None = None
    log_format: str | None = None
    bundle: str | None = None
    container_id: str | None = None
    verb_index: int = 0  # argv[1:verb_index] are the global flags
    problem: str | None = None  # a create/run command line we must not guess about


def _split(token: str) -> tuple[str, str | None]:
    name, eq, value = token.partition("=")
    return (name, value) if eq else (token, None)


def parse(argv: list[str]) -> Invocation:
    """Find verb, log settings and (for create/run) bundle and id in a runtime argv."""
    log_path = log_format = None
    i = 1
    while i < len(argv) and argv[i].startswith("-") and argv[i] != "--":
        name, value = _split(argv[i])
        name = "--" + name.lstrip("-")
        if value is None and name in GLOBAL_VALUE_FLAGS and i + 1 < len(argv):
            value = argv[i + 1]
            i += 1
        elif (
            value is None
            and name == "--rootless"
            and i + 1 < len(argv)
            and argv[i + 1] in ROOTLESS_VALUES
        ):
            i += 1
        if name == "--log":
            log_path = value
        elif name == "--log-format":
            log_format = value
        i += 1
    if i >= len(argv) or argv[i] == "--":
        return Invocation(None, log_path, log_format)
    verb = argv[i]
    if verb == "delete":  # delete [--force] ID: the id says whose devices to give back
        ids = [a for a in argv[i + 1 :] if not a.startswith("-")]
        return Invocation(verb, log_path, log_format, None, ids[0] if ids else None, i)
    if verb not in EDIT_VERBS:
        return Invocation(verb, log_path, log_format, verb_index=i)
    verb_index = i
    bundle = container_id = problem = None
    i += 1
    while i < len(argv):
        token = argv[i]
        if token.startswith("-") and token != "-":
            name, value = _split(token)
            if value is None and name in CREATE_VALUE_FLAGS and i + 1 < len(argv):
                value = argv[i + 1]
                i += 1
            if name in ("--bundle", "-b"):
                if not value:
                    problem = f"{name} needs a value (the OCI bundle directory)"
                bundle = value
        elif container_id is None:
            container_id = token
        i += 1
    return Invocation(verb, log_path, log_format, bundle, container_id, verb_index, problem)
