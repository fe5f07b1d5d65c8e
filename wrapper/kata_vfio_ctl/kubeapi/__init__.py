"""The kubelet's gRPC APIs kata-vfio speaks: the device plugin API v1beta1
(deviceplugin.proto) and the pod-resources API v1 (podresources.proto).

The *_pb2*.py modules are generated from those files by the build (generate.py): `pip
install` runs it through setup.py, `make venv` into the source tree for the tests.
"""
