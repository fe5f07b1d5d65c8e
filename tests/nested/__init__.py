"""The nested host-half test without Kata (tests/e2e/test_nested_host_e2e.py): the L1 script,
the test VM launcher that stands in for Kata 1.x as podman's inner runtime, and the program
that runs the container in L2."""
