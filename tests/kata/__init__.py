"""Harness for end-to-end tests against a real Kata Containers 1.x built from source."""
