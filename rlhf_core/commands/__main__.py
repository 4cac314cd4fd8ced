import sys

from rlhf_core.commands import main

sys.exit(main())
