"""Attacks on the running service (`make hostile`, which `.ci/run` calls; not part of `make test`)."""
