import sys

from slime_rl.cli import main

sys.exit(main())
