"""The archive's tests; the folders mirror the package. Paths every test folder shares:"""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]  # the repository's root
DATA = REPO / "tests" / "data"  # what the tests need that is not generated (licences in README)
