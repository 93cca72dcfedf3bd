import os
import sys

# The spawned ranks import tests/cases.py and tests/distributed.py by module name.
sys.path.insert(0, os.path.dirname(__file__))
