"""`mct-ray eval` for `ray job submit`:

    ray job submit --working-dir . -- python -m jobs.eval --config <recipe|file> --out <URI>
"""

import sys

from mct_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
