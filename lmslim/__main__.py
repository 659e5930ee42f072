import sys

from lmslim.cli.main import main

sys.exit(main())
