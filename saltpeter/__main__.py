import sys

from saltpeter.daemon import main

sys.exit(main())
