import sys

from .cli import main

if __name__ == "__main__":  # a spawned worker process (gradreg.runner) imports this module without running it
    sys.exit(main())
