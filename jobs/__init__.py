"""Entrypoints for `ray job submit`: `python -m jobs.<name> [options] [key=value ...]`.

Each is the `mct-ray <name>` command (see `mct-ray <name> --help`); under `ray job submit`
RAY_ADDRESS is set for the entrypoint, so the job joins that cluster.
"""
