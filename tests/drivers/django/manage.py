#!/usr/bin/env python
"""Django's command line for the driver tests' project (MERIDIAN_URL picks the database)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "djsite.settings")
from django.core.management import execute_from_command_line

execute_from_command_line(sys.argv)
