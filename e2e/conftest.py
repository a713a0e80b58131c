"""Lets every end-to-end test import the helpers beside this file (`from ports import free_port`)."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
