"""Guest side of kata-vfio: the OCI prestart hook kata-agent runs inside the VM."""
