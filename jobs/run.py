"""`mct-ray run` for `ray job submit`:

    ray job submit --working-dir . -- python -m jobs.run --config <recipe|file> --out <URI>
"""

import sys

from mct_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
