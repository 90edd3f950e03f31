"""Ray job entry point for `vocabtrim build-head`: takes the same flags, joins the cluster it runs on.

    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/build_head.py --help

Inside a Ray job the job supervisor sets RAY_ADDRESS to the cluster's GCS address, and vocabtrim
joins it (`--address` is only needed outside a job). See jobs/README.md.
"""

import sys

from vocabtrim.cli import main

if __name__ == "__main__":
    sys.exit(main(["build-head", *sys.argv[1:]]))
