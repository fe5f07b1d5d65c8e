"""Test-only inner OCI runtime on the host: records what Kata would have received.

kata-vfio (the wrapper podman runs) edits the bundle's config.json and execs its inner
runtime, which is Kata's kata-runtime in production. No Kata runs here, and runc cannot
stand in on this host (it may not raise RLIMIT_MEMLOCK to unlimited, which is exactly
what the wrapper adds). So on `create` or `run` this program copies the bundle's
config.json to $KVFIO_SPEC_DIR/<container id>.json and fails with one line naming
the copy; `delete` (podman's clean-up after the failed create) succeeds, as there is
nothing to delete; any other verb fails. tests/e2e/test_dpdk_vm.py runs the recorded spec
in a guest.

Run by a launcher that sets KVFIO_SPEC_DIR (podman gives runtimes a clean
environment): python3 -I -S spec-recorder.py ARGS...
"""

import json
import os
import shutil
import sys

VERBS = ("create", "run", "delete")


def option(args, name):
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def fail(args, message):
    # podman reads a runtime's error from --log (JSON lines, as runc writes them)
    log = option(args, "--log")
    if log:
        with open(log, "a") as f:
            f.write(json.dumps({"level": "error", "msg": message}) + "\n")
    print(message, file=sys.stderr)
    sys.exit(1)


def main():
    args = sys.argv[1:]
    verb = next((a for a in args if a in VERBS), None)
    if verb == "delete":
        return
    if verb is None:
        fail(args, f"spec-recorder: nothing to do for {args}")
    bundle = option(args, "--bundle") or option(args, "-b") or "."
    cid = args[-1]
    dest = os.path.join(os.environ["KVFIO_SPEC_DIR"], cid + ".json")
    shutil.copyfile(os.path.join(bundle, "config.json"), dest)
    fail(args, f"spec-recorder: recorded the spec for Kata in {dest}; no Kata runs here")


main()
