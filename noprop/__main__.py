import sys

from noprop.cli import main

sys.exit(main())
