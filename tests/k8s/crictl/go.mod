// crictl for inspecting the Kubernetes tests' private containerd: sigs.k8s.io/cri-tools at
// one release. Built by tests/k8s/build.py into $KATA_VFIO_CACHE; nothing here is vendored.
module kata-vfio.test/crictl

go 1.24.1

require sigs.k8s.io/cri-tools v1.34.0
