"""``python -m vilex`` == the ``vilex`` console script."""
import sys

from vilex.cli.main import main

sys.exit(main())
