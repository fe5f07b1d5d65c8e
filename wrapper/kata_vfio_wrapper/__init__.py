"""Host side of kata-vfio: the OCI runtime wrapper podman runs, and the host tools."""
