#!/bin/bash
# dracut module: the kata-vfio guest prestart hook, the Python it runs on, and the
# VFIO kernel modules. Files to install come from initrd/build.py, which lists the
# exact Python modules the hook imports (KATA_VFIO_FILELIST: "source<TAB>dest" lines).

check() {
    # never pulled in by host-only images: ask for it with -m / --add kata-vfio
    [[ -n "$KATA_VFIO_FILELIST" && -r "$KATA_VFIO_FILELIST" ]] || return 1
    return 255
}

depends() {
    echo base
}

installkernel() {
    # the VFIO modules that exist for the target kernel (names changed across versions)
    local mod
    for mod in vfio vfio_pci vfio_pci_core vfio_iommu_type1 vfio_virqfd irqbypass; do
        if modinfo -k "$kernel" "$mod" &>/dev/null; then
            hostonly='' instmods "$mod"
        fi
    done
}

install() {
    local src dst
    inst_multiple -o modprobe
    inst_binary "$KATA_VFIO_PYTHON" /usr/bin/python3
    while IFS=$'\t' read -r src dst; do
        case "$src" in
            *.so) inst_binary "$src" "$dst" ;;  # with the libraries it links (libffi...)
            *) inst_simple "$src" "$dst" ;;
        esac
    done < "$KATA_VFIO_FILELIST"
    # kata-agent skips symlinks in guest_hook_path: the hook is a real file
    inst_simple "$KATA_VFIO_HOOK" /usr/share/oci/hooks/prestart/kata-vfio-hook
    chmod 0755 "${initdir}/usr/share/oci/hooks/prestart/kata-vfio-hook"
}
