"""Make ``benchmarks`` importable as a package when pytest runs this folder."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
