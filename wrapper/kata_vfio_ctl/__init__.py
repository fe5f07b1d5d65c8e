"""`kata-vfio-ctl`: the host tools (devices, bind/restore, doctor, install)."""
