import sys

from mixq.cli.main import main

sys.exit(main())
