import sys

from mlifast.cli import main

sys.exit(main())
