import sys
from pathlib import Path

# Make tests/shared_paths.py importable as a plain module from every test file.
sys.path.insert(0, str(Path(__file__).resolve().parent))
