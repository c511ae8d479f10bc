"""python -m wavefront: the `wavefront` command."""
import sys

from wavefront.cli import main

sys.exit(main())
