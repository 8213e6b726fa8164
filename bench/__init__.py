"""`make bench`: how close the worker comes to what this machine allows, measured side by side."""
