"""``python -m vl2lab.workbook run|refresh``: see :mod:`vl2lab.workbook.runner`."""
import sys

from vl2lab.workbook.runner import main

if __name__ == "__main__":
    sys.exit(main())
