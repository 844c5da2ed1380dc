import sys

from vqt.apps.cli import main

sys.exit(main())
