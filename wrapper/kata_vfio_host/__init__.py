"""What the OCI runtime wrapper and the host tools share: settings, the device
ownership ledger, bind/restore, device use, netlink and pci.ids look-ups."""
