"""`mct-ray grid` for `ray job submit`:

    ray job submit --working-dir . -- python -m jobs.grid --spec <name|file> --out <URI>
    ray job submit --working-dir . -- python -m jobs.grid --out <URI> --resume
"""

import sys

from mct_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["grid", *sys.argv[1:]]))
