"""`mct-ray experts` for `ray job submit`:

    ray job submit --working-dir . -- python -m jobs.experts --config <recipe|file> --out <URI>
"""

import sys

from mct_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["experts", *sys.argv[1:]]))
