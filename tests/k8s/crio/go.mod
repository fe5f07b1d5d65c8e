// The CRI-O the CRI-O tests run: github.com/cri-o/cri-o at one release (its go.mod has no
// replace directives to repeat here). Built by tests/crio/build.py into $KATA_VFIO_CACHE;
// nothing here is vendored.
module kata-vfio.test/crio

go 1.24.1

require github.com/cri-o/cri-o v1.34.0
