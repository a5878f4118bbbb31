import sys

from gptedge.runtime.cli import main

sys.exit(main())
