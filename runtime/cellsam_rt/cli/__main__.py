import sys

from cellsam_rt.cli.main import main

sys.exit(main())
