import sys

from gossipdqn.cli import main

sys.exit(main())
