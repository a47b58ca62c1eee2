"""Serving benchmark; the same as `reprmerge bench serve` (see reprmerge_bench/serve.py for the cases)."""

import sys

from reprmerge_cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "serve", *sys.argv[1:]]))
