import sys

from flowpo.cli import main

sys.exit(main())
