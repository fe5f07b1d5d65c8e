"""`kata-vfio`: the OCI runtime wrapper podman runs (create edits config.json,
every other verb passes straight through)."""
