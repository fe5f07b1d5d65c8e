// kata-vfio-confcheck: what Kata 3.x's containerd shim makes of an OCI bundle, for tests.
//
// It does the shim's own steps (src/runtime/pkg/containerd-shim-v2/create.go, loadRuntimeConfig
// and create): the configuration file named by the io.katacontainers.config_path annotation
// (else the argument), loaded with katautils.LoadConfiguration, then oci.SandboxConfig, which
// applies the spec's annotations and refuses hypervisor ones that enable_annotations does not
// list. It prints the values kata-vfio relies on as one JSON object, or exits 1 with Kata's
// error. Built by tests/kata3/build.py from Kata's vendored sources; not shipped.
//
// Usage: kata-vfio-confcheck BUNDLE [CONFIG]
package main

import (
	"encoding/json"
	"fmt"
	"os"

	"github.com/kata-containers/kata-containers/src/runtime/pkg/device/config"
	"github.com/kata-containers/kata-containers/src/runtime/pkg/katautils"
	"github.com/kata-containers/kata-containers/src/runtime/pkg/oci"
	"github.com/kata-containers/kata-containers/src/runtime/virtcontainers/pkg/compatoci"
)

func vfioMode(m config.VFIOModeType) string {
	if m == config.VFIOModeVFIO {
		return "vfio"
	}
	return "guest-kernel"
}

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: kata-vfio-confcheck BUNDLE [CONFIG]")
		os.Exit(2)
	}
	bundle := os.Args[1]
	spec, err := compatoci.ParseConfigJSON(bundle)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	configPath := oci.GetSandboxConfigPath(spec.Annotations)
	if configPath == "" && len(os.Args) > 2 {
		configPath = os.Args[2]
	}
	resolved, runtimeConfig, err := katautils.LoadConfiguration(configPath, true)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	sandbox, err := oci.SandboxConfig(spec, runtimeConfig, bundle, "kata-vfio-confcheck", false, false)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	h := sandbox.HypervisorConfig
	out := map[string]interface{}{
		"ConfigPath":        resolved,
		"MachineType":       h.HypervisorMachineType,
		"EnableIOMMU":       h.IOMMU,
		"HotPlugVFIO":       h.HotPlugVFIO,
		"ColdPlugVFIO":      h.ColdPlugVFIO,
		"PCIeRootPort":      h.PCIeRootPort,
		"GuestHookPath":     h.GuestHookPath,
		"EnableAnnotations": h.EnableAnnotations,
		"KernelPath":        h.KernelPath,
		"ImagePath":         h.ImagePath,
		"InitrdPath":        h.InitrdPath,
		"ConfigVfioMode":    vfioMode(runtimeConfig.VfioMode),
		"SandboxVfioMode":   vfioMode(sandbox.VfioMode),
	}
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
