import os
import sys

# The spawned ranks import tests/ranks/*.py (as ranks.<name>) and tests/distributed.py by module
# name.
sys.path.insert(0, os.path.dirname(__file__))
