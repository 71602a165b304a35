"""`mct-ray distill` for `ray job submit`:

    ray job submit --working-dir . -- python -m jobs.distill --config <recipe|file> --out <URI>
"""

import sys

from mct_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["distill", *sys.argv[1:]]))
