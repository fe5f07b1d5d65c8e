#!/bin/bash
# dracut module: the kata-vfio guest prestart hook, the Python it runs on, and the
# VFIO kernel modules. Self-contained once generated: `make install-dracut-module`
# (initrd/dracut_module.py) writes beside this file what install() reads:
#   files.tsv       "source<TAB>destination": the standard-library files the hook imports
#                   (absolute paths) and the kata-vfio packages in pylib/ (relative paths)
#   python          the interpreter to install as /usr/bin/python3
#   kata-vfio-hook  the hook's launcher

check() {
    if [[ ! -r "$moddir/files.tsv" || ! -r "$moddir/python" || ! -x "$moddir/kata-vfio-hook" ]]
    then
        # only when asked for: a host-only scan of every module should stay quiet
        [[ $hostonly ]] || derror "kata-vfio: $moddir is not generated;" \
            "install it with: make install-dracut-module DRACUT_MODULES_DIR=${moddir%/*}"
        return 1
    fi
    # never pulled in by host-only images: ask for it with add_dracutmodules / --add kata-vfio
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
    local src dst python
    read -r python < "$moddir/python"
    inst_multiple -o modprobe
    inst_binary "$python" /usr/bin/python3
    while IFS=$'\t' read -r src dst; do
        [[ $src == /* ]] || src="$moddir/$src"
        case "$src" in
            *.so) inst_binary "$src" "$dst" ;;  # with the libraries it links (libffi...)
            *) inst_simple "$src" "$dst" ;;
        esac
    done < "$moddir/files.tsv"
    # kata-agent skips symlinks in guest_hook_path: the hook is a real file
    inst_simple "$moddir/kata-vfio-hook" /usr/share/oci/hooks/prestart/kata-vfio-hook
    chmod 0755 "${initdir}/usr/share/oci/hooks/prestart/kata-vfio-hook"
}
