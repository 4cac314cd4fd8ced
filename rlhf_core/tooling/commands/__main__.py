import sys

from rlhf_core.tooling.commands import main

sys.exit(main())
