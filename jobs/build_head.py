"""Ray job entry point for `vocabtrim build-head`: takes the same flags and runs in the job's driver process
(build-head starts no Ray actors: it reads a histogram and writes a head).

    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/build_head.py --help

See jobs/README.md.
"""

import sys

from vocabtrim.cli import main

if __name__ == "__main__":
    sys.exit(main(["build-head", *sys.argv[1:]]))
