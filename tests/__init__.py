"""The test suite: tests/sr_tf mirrors the library's packages, tests/data_prep its
front end; front-end tests (the app) at the top."""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
