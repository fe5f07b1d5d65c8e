// Test-setup source (kata-vfio, tests/kata/build_kata1.py): the main package of Kata 1.x's
// containerd-shim-kata-v2. The Kata 1.x source tarball has the shim's library
// (runtime/containerd-shim-v2) and the Makefile target `containerd-shim-v2`, which builds
// runtime/cli/containerd-shim-kata-v2/, but lacks that directory. build_kata1.py copies this
// file there; the Makefile links cli/config-generated.go (package main: version, commit,
// project, the default configuration paths) next to it.
package main

import (
	"fmt"
	"os"

	"github.com/containerd/containerd/runtime/v2/shim"
	containerdshim "github.com/kata-containers/runtime/containerd-shim-v2"
)

// runtimeID names this runtime in containerd's logs and the shim's error messages.
const runtimeID = "io.containerd.kata.v2"

// binaryOptions: the Kata service waits for its own children (QEMU, the proxy) with
// os/exec, so containerd's implicit reaper must not take their exit statuses, and a
// daemonized QEMU is left to init rather than becoming the shim's unreaped orphan.
func binaryOptions(c *shim.Config) {
	c.NoReaper = true
	c.NoSubreaper = true
}

func main() {
	if len(os.Args) == 2 && (os.Args[1] == "--version" || os.Args[1] == "-version") {
		fmt.Printf("%s containerd shim (kata-vfio test build): id: %q, version: %s, commit: %v\n",
			project, runtimeID, version, commit)
		return
	}
	shim.Run(runtimeID, containerdshim.New, binaryOptions)
}
